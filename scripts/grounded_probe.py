"""Grounded confidence on the shipped base: which prompt layout and which loss teach a
confidence-only adapter to follow the base model's own correctness?

    python scripts/grounded_probe.py [--out runs/grounded_probe] [--threads 1]
        [--train-scenes 600] [--eval-scenes 100] [--flip-share 0.0]
        [--layouts single_turn follow_up question_first] [--losses ce brier soft_ce]
        [--target internal] [--steps 200] [--lr LR] [--r R] [--batch N] [--seed 0]
        [--rows-dir DIR] [--no-probe] [--base embedded] [--probe-adapter DIR]

1. Training rows in the grounded schema, all clean: world POPE-style questions (random
   negatives) on csp-split scenes, the base model's own greedy answer quoted, the target
   ``internal`` = its temperature-scaled internal probability of that answer (T fitted on these
   rows), ``correct`` and ``cell`` beside it; a share of answer-flip rows (opposite answer,
   complementary target).
2. A LoRA per (layout, loss), trained with ``regimes.train_sft`` on the option losses, grounded
   CSP's recipe on the embedded preset otherwise (``learning_curve.recipe_config``: ``--lr``,
   ``--r`` and ``--batch`` override it only where given).
3. Held-out world POPE (random, adversarial) from eval-split scenes, evaluated with the
   confidence-only adapter (answers are the base model's): AUROC, Brier, ECE of the
   single-pass expected confidence, beside the base model's internal probability and its
   temperature-scaled version (T fitted on the eval split's calibration range), and the
   untrained base model's own verbalized confidence in the same layout.
4. A linear probe (L2 logistic regression on the frozen base model's hidden states at the
   position that predicts the reply's first distinguishing token: the answer prompt's last
   position, and for a confidence layout the options' shared " " after it, where the digits
   are scored; trained on the training rows, AUROC of own correctness on the held-out rows)
   for the answer prompt and each confidence layout: is the evidence there to be read? With
   ``--probe-adapter`` the hidden states are also read with that trained adapter on (is the
   evidence at its confidence position now?).

Writes ``results.json`` and ``results.md`` under ``--out`` (runs already trained are kept:
their adapters are reused when the configuration is unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from learning_curve import recipe_config  # scripts/ is on the path: the script's own folder

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EVAL_SETS = ("pope-random", "pope-adversarial")


def own_answers(model, processor, items, images, batch_size: int = 64):
    """(own answer "Yes"/"No"/None, internal probability of it) per item, from the
    evaluation's answer path (one generated token suffices: the first answer token)."""
    from csp_utils.vlm import engine, parsing, prompts

    yn = engine.yes_no_tokens(processor)
    out = []
    for s in range(0, len(items), batch_size):
        its, ims = items[s:s + batch_size], images[s:s + batch_size]
        msgs = [prompts.answer_messages(it.question) for it in its]
        turn = engine.answer_turn(model, processor, msgs, ims, len(yn.prefix) + 1,
                                  lambda r: parsing.parse_yes_no(r, "pope"), yn, share_prefix=False)
        out += [(a.capitalize() if a else None, q[0]) for a, q in zip(turn.parsed, turn.internal)]
    return out


def grounded_rows(model, processor, n_scenes: int, flip_share: float, seed: int):
    """Clean grounded rows from csp-split scenes (see the module docstring) and the fitted T."""
    import numpy as np

    from csp_utils.core import baselines
    from csp_utils.world import scenes as world, benchmarks

    wc = world.WorldConfig()
    scene_list = benchmarks.pope_scenes(n_scenes, wc, split="csp")
    bench = benchmarks.build_world_pope(scene_list, "random", seed=seed)
    images = [bench.image_loader(it.image_id).convert("RGB") for it in bench.items]
    answers = own_answers(model, processor, bench.items, images)
    keep = [i for i, (a, p) in enumerate(answers) if a is not None and p is not None]
    correct = np.array([answers[i][0].lower() == bench.items[i].label for i in keep], dtype=float)
    p_own = np.array([answers[i][1] for i in keep])
    T = baselines.fit_temperature(p_own, correct)
    p_t = baselines.temperature_scale(p_own, T)
    cell = {}
    for i, ok in zip(keep, correct):  # clean rows: one level; cell = (answer, kind)
        cell.setdefault(answers[i][0], []).append(ok)
    cell_acc = {a: int(round(100 * float(np.mean(v)))) for a, v in cell.items()}
    rows = []
    for j, i in enumerate(keep):
        it, own = bench.items[i], answers[i][0]
        rows.append(dict(image=images[i], sample_id=it.question_id, source_id=it.question_id, image_id=it.image_id,
                         question=it.question, label=it.label, kind=it.kind, level=100, noise_on="none",
                         answer=own, own_answer=own, flipped=False, correct=int(correct[j]),
                         internal_p=float(p_t[j]), cell_acc=cell_acc[own]))
    rng = np.random.default_rng(seed)
    for r in [rows[k] for k in rng.choice(len(rows), int(round(flip_share * len(rows))), replace=False)]:
        other = "No" if r["answer"] == "Yes" else "Yes"
        rows.append({**r, "sample_id": r["sample_id"] + "-flip", "answer": other, "flipped": True,
                     "correct": 1 - r["correct"], "internal_p": 1.0 - r["internal_p"],
                     "cell_acc": 100 - cell_acc[r["own_answer"]]})
    stats = {"n_questions": len(bench.items), "n_answered": len(keep), "n_rows": len(rows),
             "n_flip": len(rows) - len(keep), "accuracy": float(correct.mean()), "temperature": T,
             "cell_acc": cell_acc}
    return rows, stats


def to_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


def cached_rows(model, processor, args, out: Path):
    """The training rows, built once per (scenes, flip share, seed) under ``out/train_rows``."""
    import datasets

    key = {"train_scenes": args.train_scenes, "flip_share": args.flip_share, "seed": args.seed}
    folder, meta = out / "train_rows", out / "train_rows.json"
    if meta.exists() and json.loads(meta.read_text()).get("key") == key:
        ds = datasets.load_from_disk(str(folder))
        return [dict(r) for r in ds], json.loads(meta.read_text())["stats"], ds
    rows, stats = grounded_rows(model, processor, args.train_scenes, args.flip_share, args.seed)
    ds = to_dataset(rows)
    ds.save_to_disk(str(folder))
    meta.write_text(json.dumps({"key": key, "stats": stats}))
    return rows, stats, ds


def eval_sets(n_scenes: int, seed: int):
    from csp_utils.evaluate import suites

    cfg = suites.SuiteConfig(n_pope_images=n_scenes, n_calibration_images=n_scenes, seed=seed)
    return suites.build_suite(cfg, sets=list(EVAL_SETS) + ["calibration"])


def elicit(model, processor, bench, layout: str, scope: str, batch_size: int = 64):
    from csp_utils.vlm import engine
    from csp_utils.evaluate import evaluation as ev

    cfg = ev.EvalConfig(readouts=("single_pass",), layout=layout, adapter_scope=scope, batch_size=batch_size,
                        max_new_tokens=4, progress=False)
    parse = ev.answer_parser(bench)
    option_ids = engine.option_token_ids(processor, cfg.options)
    yn = engine.yes_no_tokens(processor)
    rows = []
    model.eval()
    for s in range(0, len(bench.items), batch_size):
        its = bench.items[s:s + batch_size]
        ims = [bench.image_loader(it.image_id).convert("RGB") for it in its]
        rows += ev.elicit_batch(model, processor, its, ims, cfg, "m", parse, option_ids, yn)
    return rows


def scores(conf, correct) -> dict:
    from csp_utils.core import metrics

    s = metrics.calibration_summary(conf, correct)
    return {k: round(float(s[k]), 4) for k in ("auroc", "brier", "ece", "mean_confidence", "accuracy")}


def pooled(rows_by_set):
    return [r for rs in rows_by_set.values() for r in rs]


# ----------------------------------------------------------------------------- linear probe
def last_hidden(model, processor, msgs_list, images, batch_size: int = 64, then: list[int] = ()):
    """(N, layers + 1, H) hidden states at the position that predicts the first token in which the
    replies differ: the last prompt position (generation prompt on), after the tokens ``then``
    that every reply starts with. The confidence options share a leading " ", so their digits
    are predicted one position after the prompt; the probe reads that position."""
    import torch

    from csp_utils.vlm import engine

    out = []
    with torch.no_grad():
        for s in range(0, len(msgs_list), batch_size):
            p = engine.plain_prompts(model, processor, msgs_list[s:s + batch_size], images[s:s + batch_size],
                                     shortcuts=True)
            ids, mask = p.input_ids, p.attention_mask
            if then:
                tail = torch.tensor(list(then), dtype=ids.dtype).expand(ids.shape[0], -1)
                ids, mask = torch.cat([ids, tail], 1), torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], 1)
            o = model(input_ids=ids, attention_mask=mask, position_ids=engine.position_ids_from_mask(mask),
                      **p.image_inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            out.append(torch.stack([h[:, -1] for h in o.hidden_states], 1).float())
    return torch.cat(out)


def probe_auroc(x_train, y_train, x_test, y_test, l2: float = 1e-2) -> float:
    """Held-out AUROC of an L2 logistic regression (standardised features, LBFGS)."""
    import torch

    from csp_utils.core import metrics

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    y = torch.tensor(y_train, dtype=torch.float32)
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(metrics.auroc(torch.sigmoid(b @ w + c).numpy(), y_test))


def probe_layouts(model, processor, train_rows, eval_rows_images, layouts):
    """Probe AUROC per prompt (answer prompt, each confidence layout) and hidden layer."""
    from csp_utils.vlm import engine, prompts

    tr = [r for r in train_rows if not r["flipped"]]
    ev_rows, ev_images = eval_rows_images
    out = {}
    for name in ("answer_prompt",) + tuple(layouts):
        def msgs(q, a):
            if name == "answer_prompt":
                return prompts.answer_messages(q)
            return prompts.confidence_messages(q, a, layout=name)

        then = (engine.yes_no_tokens(processor).prefix if name == "answer_prompt"
                else engine.common_prefix(engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout=name)))
        xa = last_hidden(model, processor, [msgs(r["question"], r["answer"]) for r in tr], [r["image"] for r in tr],
                         then=then)
        xb = last_hidden(model, processor, [msgs(r["question"], r["response"]) for r in ev_rows], ev_images,
                         then=then)
        ya = [r["correct"] for r in tr]
        yb = [bool(r["correct"]) for r in ev_rows]
        out[name] = {f"layer{k}": round(probe_auroc(xa[:, k], ya, xb[:, k], yb), 4) for k in range(xa.shape[1])}
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/grounded_probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-scenes", type=int, default=600)
    ap.add_argument("--eval-scenes", type=int, default=100)
    ap.add_argument("--flip-share", type=float, default=0.0)
    ap.add_argument("--layouts", nargs="+", default=["single_turn", "follow_up", "question_first"])
    ap.add_argument("--losses", nargs="*", default=["ce", "brier", "soft_ce"], help="none: no adapter trained")
    ap.add_argument("--target", default="internal", choices=["correct", "cell", "internal"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="default: grounded CSP's")
    ap.add_argument("--r", type=int, default=None, help="LoRA rank, alpha twice it; default: grounded CSP's")
    ap.add_argument("--batch", type=int, default=None, help="default: grounded CSP's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--rows-dir", default=None, help="where the training rows are cached (default: --out)")
    ap.add_argument("--base", default="embedded", help="base model (name or folder)")
    ap.add_argument("--probe-adapter", default=None, help="also probe with this trained adapter on")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from csp_utils.core import baselines
    from csp_utils.vlm import models
    from csp_utils.train import callbacks, regimes

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, proc = models.load_vlm(args.base, dtype=torch.float32)
    base.eval()
    rows, data_stats, ds = cached_rows(base, proc, args, Path(args.rows_dir) if args.rows_dir else out)
    data_stats.setdefault("build_s", round(time.time() - t0, 1))
    print(f"[data] {data_stats}", flush=True)

    suite = eval_sets(args.eval_scenes, args.seed)
    # baselines on the base model's own answers: internal, and temperature-scaled with T from
    # the eval split's calibration range
    t1 = time.time()
    base_rows = {name: elicit(base, proc, suite[name], "single_turn", "all") for name in EVAL_SETS}
    calib = elicit(base, proc, suite["calibration"], "single_turn", "all")
    ok = [r for r in calib if r["internal_prob"] is not None]
    T = baselines.fit_temperature([r["internal_prob"] for r in ok], [r["correct"] for r in ok])
    pool = pooled(base_rows)
    correct = [bool(r["correct"]) for r in pool]
    internal = [np.nan if r["internal_prob"] is None else r["internal_prob"] for r in pool]
    results = {"args": vars(args), "data": data_stats, "eval": {
        "sets": list(EVAL_SETS), "n_questions": len(pool), "accuracy": float(np.mean(correct)),
        "temperature_calibration": T}}
    results["baselines"] = {
        "internal": scores(internal, correct),
        "temperature_scaled_internal": scores(list(baselines.temperature_scale(np.array(internal), T)), correct),
        "base_verbalized_single_turn": scores([r["confidence"] for r in pool], correct),
    }
    print(f"[baselines] {results['baselines']} ({time.time() - t1:.0f} s)", flush=True)

    results["runs"] = {}
    for layout in args.layouts:
        base_layout = pooled({n: elicit(base, proc, suite[n], layout, "all") for n in EVAL_SETS})
        results["baselines"][f"base_verbalized_{layout}"] = scores([r["confidence"] for r in base_layout],
                                                                   [bool(r["correct"]) for r in base_layout])
        for loss in args.losses:
            name = f"{layout}-{loss}-{args.target}"
            cfg = recipe_config(args, confidence_target=args.target, layout=layout, loss=loss,
                                max_steps=args.steps, logging_steps=25, save_steps=10_000, seed=args.seed)
            t2 = time.time()
            res = regimes.train_sft(args.base, ds, out, cfg, name=name)
            train_s = time.time() - t2
            model, _ = models.load_vlm(args.base, adapter=res.adapter_dir, dtype=torch.float32)
            t3 = time.time()
            got = pooled({n: elicit(model, proc, suite[n], layout, "confidence") for n in EVAL_SETS})
            same_answers = all(a["raw_answer"] == b["raw_answer"] for a, b in zip(got, pool))
            logs = callbacks.read_training_log(res.log_csv)
            results["runs"][name] = {
                "layout": layout, "loss": loss, "target": args.target, "steps": res.global_step,
                "train_s": round(train_s, 1), "eval_s": round(time.time() - t3, 1),
                "answers_equal_base": same_answers,
                "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
                **scores([r["confidence"] for r in got], [bool(r["correct"]) for r in got]),
                "spearman_internal": round(float(np.corrcoef(
                    np.argsort(np.argsort([r["confidence"] for r in got])),
                    np.argsort(np.argsort([r["internal_prob"] or 0 for r in got])))[0, 1]), 4),
            }
            print(f"[run] {name}: {results['runs'][name]}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))

    if not args.no_probe:
        t4 = time.time()
        ev_images = [suite[n].image_loader(r["image_id"]).convert("RGB") for n in EVAL_SETS for r in base_rows[n]]
        results["probe"] = probe_layouts(base, proc, rows, (pool, ev_images), args.layouts)
        if args.probe_adapter:
            tuned, _ = models.load_vlm(args.base, adapter=args.probe_adapter, dtype=torch.float32)
            with_adapter = probe_layouts(tuned, proc, rows, (pool, ev_images), args.layouts)
            results["probe"].update({f"{k} (adapter on)": v for k, v in with_adapter.items()})
        results["probe_s"] = round(time.time() - t4, 1)
        print(f"[probe] {results['probe']}", flush=True)
    results["total_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = ["| confidence | AUROC | Brier | ECE | mean conf |", "|---|---|---|---|---|"]
    for name, s in results["baselines"].items():
        lines.append(f"| {name} | {s['auroc']:.3f} | {s['brier']:.3f} | {s['ece']:.3f} | {s['mean_confidence']:.3f} |")
    for name, s in results.get("runs", {}).items():
        lines.append(f"| adapter {name} ({s['steps']} steps, {s['train_s']:.0f} s) | {s['auroc']:.3f} | "
                     f"{s['brier']:.3f} | {s['ece']:.3f} | {s['mean_confidence']:.3f} |")
    if "probe" in results:
        lines += ["", "| probe (held-out AUROC of own correctness) | " + " | ".join(
            next(iter(results["probe"].values()))) + " |", "|---|" + "---|" * len(next(iter(results["probe"].values())))]
        for name, per_layer in results["probe"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_layer.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
