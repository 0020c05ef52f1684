"""Grounded CSP's learning curve: does the confidence turn learn to rank its base model's own
answers within a set when it sees more rows, and with which target, layout and clean share?

    python scripts/learning_curve.py [--base embedded] [--out runs/learning_curve/<base>]
        [--points 600:200 2400:800 9600:3200] [--targets internal correct]
        [--layouts follow_up inline] [--clean-shares SHARE ...] [--questions world|benchmark]
        [--seeds 0] [--checkpoints 4] [--val-images 100] [--lr LR] [--r R] [--batch N] [--threads 1]
        [--dropout P] [--target-modules NAME ...]
        [--loss soft_ce|binomial_ce|brier] [--global-share 0.0] [--perturbed-val 0]

1. One grounded dataset per clean share on CSP scenes 0 .. max(points) - 1, built by the study's
   builder with grounded CSP's build settings (``methods.build_fields("grounded_csp")``; the
   clean share and question source the recipe's unless given); a point with fewer scenes
   trains on the rows of its first scenes (the same targets: T is fitted once, on the held-out
   20% of the largest build's scenes).
2. A confidence-only LoRA per point (scenes:steps) x target x layout x clean share x seed, the
   study's grounded recipe on the embedded preset otherwise
   (``settings.make_configs("tiny_default", method="grounded_csp")``; ``--lr``, ``--r`` (alpha
   twice it), ``--dropout``, ``--target-modules`` and ``--batch`` override it only where given), saving ``--checkpoints`` evenly spaced checkpoints.
3. Every checkpoint scored on a **validation split**: the six clean sets' generators (POPE
   random / popular / adversarial, AMBER-style existence / attribute / relation) on CSP-split
   scenes far from the training ones (``VALIDATION_STARTS``), never evaluation images. Within-set
   AUROC (the mean of the six sets' AUROCs), pooled Brier and ECE, of the option distribution's
   expectation (the study's read-out) and, under ``mode``, of its most likely option; beside them the base model's
   internal probability of its own answer, temperature-scaled (T fitted on a seventh
   validation set), the ceiling a read-out of the answer's own evidence reaches.
4. Early stopping and selection read the validation scores only: per run the checkpoint with the
   highest within-set AUROC (lower Brier breaks ties).
5. With ``--perturbed-val N``, every checkpoint (and the base model's temperature-scaled
   probability) is also scored on CSP-perturbed validation rows: N CSP-split scenes
   (``PERTURBED_VAL_START`` on), each question planned as the training build plans it (the
   same clean, global and key shares and levels), so the validation rows perturb as the
   training rows do on images never trained on. Brier, ECE, mean confidence and accuracy there,
   pooled and per noise target.

Writes as it goes and resumes: ``results.jsonl`` (one line per scored checkpoint), then
``results.md`` (the table) and ``learning_curve.png``/``.pdf`` (within-set AUROC against
training rows seen).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

METHOD = "grounded_csp"  # the recipe every run starts from
# CSP-split scenes of the perturbed validation rows (past the clean validation sets' ranges)
PERTURBED_VAL_START = 520_000
VALIDATION_SETS = ("pope-random", "pope-popular", "pope-adversarial", "amber-existence", "amber-attribute",
                   "amber-relation")
# CSP-split scene ranges of the validation sets (training builds use CSP scenes from 0 upwards)
VALIDATION_STARTS = {"pope-random": 300_000, "pope-popular": 330_000, "pope-adversarial": 360_000,
                     "amber-existence": 400_000, "amber-attribute": 430_000, "amber-relation": 460_000,
                     "calibration": 490_000}


def parse_point(text: str) -> tuple[int, int]:
    try:
        scenes, steps = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is SCENES:STEPS (e.g. 600:200), got {text!r}") from None
    if scenes < 1 or steps < 1:
        raise argparse.ArgumentTypeError(f"scenes and steps must be >= 1, got {text!r}")
    return scenes, steps


def validation_suite(n_images: int, seed: int = 0) -> dict:
    """The six clean sets' generators (and a calibration set) on CSP-split validation scenes."""
    from csp_utils.world import scenes as world, benchmarks

    wc = world.WorldConfig()
    suite = {}
    for kind in benchmarks.POPE_KINDS:
        name = f"pope-{kind}"
        sc = benchmarks.pope_scenes(n_images, wc, split="csp", start=VALIDATION_STARTS[name])
        suite[name] = benchmarks.build_world_pope(sc, kind, seed=seed)
    for kind in benchmarks.AMBER_KINDS:
        name = f"amber-{kind}"
        sc = world.make_scenes("csp", n_images, wc, start=VALIDATION_STARTS[name])
        suite[name] = benchmarks.build_world_amber(sc, kind, seed=seed)
    sc = benchmarks.pope_scenes(n_images, wc, split="csp", start=VALIDATION_STARTS["calibration"])
    suite["calibration"] = benchmarks.build_world_pope(sc, "random", seed=seed)
    return suite


def training_scene_range(max_scenes: int) -> range:
    return range(0, max_scenes)


def check_disjoint(suite: dict, max_scenes: int) -> None:
    """Validation scenes never overlap the training scenes (nor each other)."""
    from csp_utils.world import scenes as world

    seen: dict[str, str] = {}
    for name, bench in suite.items():
        for it in bench.items:
            split, index = world.parse_scene_id(it.image_id)[:2]
            if split != "csp" or int(index) < max_scenes:
                raise ValueError(f"validation set {name} uses {it.image_id}, inside the training scenes 0..{max_scenes - 1}")
            if seen.setdefault(it.image_id, name) != name:
                raise ValueError(f"{it.image_id} is in validation sets {seen[it.image_id]} and {name}")


def build_config(clean_share: float, questions: str, seed: int = 0, global_share: float = 0.0):
    """Grounded CSP's build with the given shares and question source (no whole-image noise
    field where there is none, so that such builds keep their hash)."""
    from csp_utils.dataset import buildconfig
    from csp_utils.train import methods

    grounded = {"clean_share": clean_share, "questions": questions, **({"global_share": global_share}
                                                                         if global_share else {})}
    return buildconfig.BuildConfig(**methods.build_fields(METHOD, {"seed": seed, "grounded": grounded}))


def perturbed_validation(n_scenes: int, config, seed: int = 0):
    """CSP-split scenes from ``PERTURBED_VAL_START``, each question given the variant the
    training build ``config`` would plan for it (clean, or noised on the asked object, a
    distractor or the whole image): a benchmark whose question ids are the variants' sample ids."""
    from PIL import Image

    from csp_utils.dataset import buildconfig, grounded_rows
    from csp_utils.dataset.grounders import AnnotationGrounder
    from csp_utils.world import benchmarks, scenes as world
    from csp_utils.world.schema import QAItem

    wc = world.WorldConfig()
    opts, noise_cfg = buildconfig.options_of(config), config.effective_noise()
    scene_list = world.make_scenes("csp", n_scenes, wc, start=PERTURBED_VAL_START)
    grounder = AnnotationGrounder.from_scenes(scene_list)
    images, items = {}, []
    for sc in scene_list:
        qs = grounded_rows.scene_questions(sc, 4, seed, set_name="perturbed-val", source=opts.questions, world_config=wc)
        for v in grounded_rows.plan_scene(sc, qs, grounder, buildconfig.noised_levels(config), opts, seed, wc):
            images[v.sample_id] = grounded_rows.variant_image(sc, v, noise_cfg)
            items.append(QAItem(v.sample_id, v.sample_id, v.qa.question, v.qa.label, "perturbed-val", v.qa.kind,
                                list(v.qa.objects), subtype=v.qa.subtype))
    return benchmarks.Benchmark("perturbed-val", "pope", items, lambda i: Image.fromarray(images[i]), "yes")


def perturbed_scores(rows: list[dict], key: str = "confidence") -> dict:
    """Brier, ECE, mean confidence and accuracy of ``key`` on the perturbed validation rows,
    pooled and per noise target (the sample id's ``@<noise_on>@``)."""
    from csp_utils.core import metrics

    groups: dict[str, list[dict]] = {"all": []}
    for r in rows:
        if r[key] is None:
            continue
        groups["all"].append(r)
        groups.setdefault(r["question_id"].split("@")[-2], []).append(r)
    out = {}
    for name, rs in groups.items():
        s = metrics.calibration_summary([r[key] for r in rs], [bool(r["correct"]) for r in rs])
        out[name] = {k: round(float(s[k]), 4) for k in ("brier", "ece", "mean_confidence", "accuracy")} | {"n": len(rs)}
    return out


def build_dataset(model, processor, n_scenes: int, clean_share: float, questions: str, out: Path, seed: int = 0,
                  global_share: float = 0.0):
    from csp_utils.dataset import paper_rows, sources
    from csp_utils.world import scenes as world

    config = build_config(clean_share, questions, seed, global_share)
    source = sources.world_source(world.make_scenes("csp", n_scenes), 4, seed=seed)
    return paper_rows.build_perturbed_dataset(source, out_dir=out, config=config, model=model, processor=processor,
                                      progress=True)


def first_scenes(ds, n_scenes: int):
    """The rows of CSP scenes 0 .. n_scenes - 1."""
    from csp_utils.world import scenes as world

    keep = [i for i, s in enumerate(ds["image_id"]) if int(world.parse_scene_id(s)[1]) < n_scenes]
    return ds.select(keep)


def elicit(model, processor, bench, layout: str, scope: str, batch_size: int = 64) -> list[dict]:
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


def set_scores(rows_by_set: dict, key: str = "confidence") -> dict:
    """Within-set AUROC (mean of the sets'), per-set AUROC, pooled Brier and ECE of ``key``."""
    import numpy as np

    from csp_utils.core import metrics

    per_set = {}
    for name, rows in rows_by_set.items():
        ok = [r for r in rows if r[key] is not None]
        per_set[name] = round(float(metrics.auroc([r[key] for r in ok], [bool(r["correct"]) for r in ok])), 4)
    pool = [r for rows in rows_by_set.values() for r in rows if r[key] is not None]
    s = metrics.calibration_summary([r[key] for r in pool], [bool(r["correct"]) for r in pool])
    return {"within_auroc": round(float(np.nanmean(list(per_set.values()))), 4), "per_set_auroc": per_set,
            "brier": round(float(s["brier"]), 4), "ece": round(float(s["ece"]), 4),
            "mean_confidence": round(float(s["mean_confidence"]), 4), "accuracy": round(float(s["accuracy"]), 4)}


def mode_scores(rows_by_set: dict) -> dict:
    """:func:`set_scores` of the single-pass mode (the most likely option) instead of the expectation."""
    s = set_scores(rows_by_set, "confidence_argmax")
    return {k: s[k] for k in ("within_auroc", "per_set_auroc", "brier", "ece")}


def base_baselines(model, processor, suite: dict, out: Path, perturbed=None) -> dict:
    """The base model's internal probability and its temperature-scaled version on the validation sets."""
    import numpy as np

    from csp_utils.core import baselines

    path = out / "validation_base.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = {name: elicit(model, processor, bench, "single_turn", "all") for name, bench in suite.items()}
    calib = [r for r in rows.pop("calibration") if r["internal_prob"] is not None]
    T = baselines.fit_temperature([r["internal_prob"] for r in calib], [r["correct"] for r in calib])
    for rs in rows.values():
        for r in rs:
            p = r["internal_prob"]
            r["internal_T"] = None if p is None else float(baselines.temperature_scale(np.array([p]), T)[0])
    res = {"temperature": T, "internal_T": set_scores(rows, "internal_T"), "n": {k: len(v) for k, v in rows.items()}}
    if perturbed is not None:
        prow = elicit(model, processor, perturbed, "single_turn", "all")
        for r in prow:
            p = r["internal_prob"]
            r["internal_T"] = None if p is None else float(baselines.temperature_scale(np.array([p]), T)[0])
        res["perturbed"] = perturbed_scores(prow, "internal_T")
    path.write_text(json.dumps(res, indent=2))
    return res


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found)


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def run_name(cs: float, target: str, layout: str, scenes: int, steps: int, seed: int, questions: str) -> str:
    return f"{questions}-cs{round(100 * cs):03d}-{target}-{layout}-n{scenes}-t{steps}-s{seed}"


def recipe_config(args, **sft):
    """Grounded CSP's SFT config on the embedded preset with ``sft`` over it; ``--lr``, ``--r``
    (alpha twice it), ``--dropout``, ``--target-modules`` and ``--batch`` only where given."""
    from csp_utils.train import settings

    lora = {"r": args.r, "alpha": None if args.r is None else 2 * args.r, "dropout": args.dropout,
            "target_modules": None if args.target_modules is None else tuple(args.target_modules)}
    sft["lora"] = {**sft.get("lora", {}), **{k: v for k, v in lora.items() if v is not None}}
    flags = {"learning_rate": args.lr, "per_device_train_batch_size": args.batch, "loss": args.loss}
    return settings.make_configs("tiny_default", method=METHOD, sft={**flags, **sft}).sft


def layout_label(layout: str, activation: str) -> str:
    """The layout as the results name it: ``follow_up+aLoRA`` for an activated adapter."""
    return layout + ("+aLoRA" if activation == "confidence" else "")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="embedded")
    ap.add_argument("--out", default=None)
    ap.add_argument("--points", nargs="+", type=parse_point, default=[(600, 200), (2400, 800), (9600, 3200)])
    ap.add_argument("--targets", nargs="+", default=["internal", "correct"],
                    choices=["internal", "correct", "cell", "blend", "calibrated"])
    ap.add_argument("--layouts", nargs="+", default=["follow_up", "inline"])
    ap.add_argument("--clean-shares", nargs="+", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--activation", default="all", choices=["all", "confidence"],
                    help="confidence: an activated LoRA (PEFT's aLoRA) that acts from the follow-up question on")
    ap.add_argument("--questions", default=None, choices=["world", "benchmark"], help="default: the recipe's")
    ap.add_argument("--global-share", type=float, default=0.0,
                    help="share of the noised questions noised on the whole image")
    ap.add_argument("--perturbed-val", type=int, default=0, metavar="N",
                    help="also score on CSP-perturbed validation rows of N scenes (planned like the training rows)")
    ap.add_argument("--loss", default=None, choices=["soft_ce", "binomial_ce", "brier"], help="default: the recipe's")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--checkpoints", type=int, default=4, help="evenly spaced checkpoints scored per run")
    ap.add_argument("--val-images", type=int, default=100, help="scenes per validation set")
    ap.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--r", type=int, default=None, help="LoRA rank, alpha twice it; default: the recipe's")
    ap.add_argument("--dropout", type=float, default=None, help="LoRA dropout; default: the recipe's")
    ap.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                    help="the LoRA layers' last name components (e.g. q_proj k_proj v_proj o_proj); default: the preset's")
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapters", nargs="*", default=[], metavar="LABEL=DIR",
                    help="also score these trained grounded adapters on the validation split (e.g. the study's)")
    args = ap.parse_args(argv)

    import torch

    from csp_utils.vlm import models
    from csp_utils.dataset import buildconfig
    from csp_utils.train import methods, regimes

    recipe = buildconfig.BuildConfig(**methods.build_fields(METHOD)).grounded
    args.questions = args.questions or recipe.questions
    args.clean_shares = args.clean_shares or [recipe.clean_share]
    torch.set_num_threads(args.threads)
    # checkpoints carry no base-model record; they are put on the base they were trained on
    warnings.filterwarnings("ignore", message=".*records no base model.*")
    out = Path(args.out or f"runs/learning_curve/{args.base}")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    max_scenes = max(n for n, _ in args.points)
    suite = validation_suite(args.val_images)
    check_disjoint(suite, max_scenes)
    base, proc = models.load_vlm(args.base, dtype=torch.float32)
    t0 = time.time()
    # the first clean share's plan stands for the perturbed validation rows
    perturbed = (perturbed_validation(args.perturbed_val, build_config(args.clean_shares[0], args.questions, 0,
                                                                       args.global_share))
                 if args.perturbed_val else None)
    ref = base_baselines(base, proc, suite, out, perturbed)
    print(f"[validation] internal (T) within-set AUROC {ref['internal_T']['within_auroc']} "
          f"Brier {ref['internal_T']['brier']} ({time.time() - t0:.0f} s)", flush=True)
    val_sets = {k: v for k, v in suite.items() if k in VALIDATION_SETS}

    done = done_keys(results_path)
    for spec in args.adapters:
        label, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--adapters takes LABEL=DIR, got {spec!r}")
        if label in done:
            continue
        record = json.loads((Path(folder) / models.CONFIG_FILE).read_text())
        cfg = record["config"]
        model, _ = models.load_vlm(args.base, adapter=folder, dtype=torch.float32)
        t3 = time.time()
        got = {k: elicit(model, proc, b, cfg["layout"], "confidence") for k, b in val_sets.items()}
        step = int(record["global_step"])
        row = {"key": label, "run": label, "questions": "adapter", "clean_share": None, "target": cfg["confidence_target"],
               "layout": cfg["layout"], "scenes": None, "steps": step, "seed": cfg.get("seed"), "step": step,
               "rows_seen": step * int(cfg["per_device_train_batch_size"]), "training_rows": record.get("n_examples"),
               "train_s": 0.0, "eval_s": round(time.time() - t3, 1), "adapter": str(folder), **set_scores(got)}
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(label)
        print(f"[score] {label}: within-set AUROC {row['within_auroc']} Brier {row['brier']}", flush=True)
    for cs in args.clean_shares:
        t1 = time.time()
        data = build_dataset(base, proc, max_scenes, cs, args.questions,
                             out / "data" / f"{args.questions}-cs{round(100 * cs):03d}", global_share=args.global_share)
        print(f"[data] clean share {cs}: {len(data)} rows ({time.time() - t1:.0f} s)", flush=True)
        for scenes, steps in args.points:
            subset = first_scenes(data, scenes)
            for target in args.targets:
                for layout in args.layouts:
                    for seed in args.seeds:
                        label = layout_label(layout, args.activation)
                        name = run_name(cs, target, label, scenes, steps, seed, args.questions)
                        every = max(1, steps // args.checkpoints)
                        cfg = recipe_config(args, confidence_target=target, layout=layout, max_steps=steps,
                                            seed=seed, lora={"activation": args.activation},
                                            logging_steps=max(1, steps // 20), save_steps=every)
                        cfg.save_total_limit = None  # every checkpoint is scored (None in make_configs keeps 2)
                        t2 = time.time()
                        res = regimes.train_sft(args.base, subset, out / "train", cfg, name=name)
                        train_s = time.time() - t2
                        for step, ckpt in checkpoints(res.checkpoint_dir):
                            key = f"{name}@{step}"
                            if key in done:
                                continue
                            t3 = time.time()
                            model, _ = models.load_vlm(args.base, adapter=ckpt, dtype=torch.float32)
                            got = {k: elicit(model, proc, b, layout, "confidence") for k, b in val_sets.items()}
                            if perturbed is not None:
                                got_p = perturbed_scores(elicit(model, proc, perturbed, layout, "confidence"))
                            row = {"key": key, "run": name, "questions": args.questions, "clean_share": cs,
                                   "target": target, "layout": label, "scenes": scenes, "steps": steps,
                                   "seed": seed, "step": step, "rows_seen": step * cfg.per_device_train_batch_size,
                                   "training_rows": len(subset), "train_s": round(train_s, 1),
                                   "eval_s": round(time.time() - t3, 1), **set_scores(got),
                                   "mode": mode_scores(got),
                                   **({"perturbed": got_p} if perturbed is not None else {})}
                            with results_path.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                            done.add(key)
                            more = (f" perturbed Brier {got_p['all']['brier']} ECE {got_p['all']['ece']}"
                                    if perturbed is not None else "")
                            print(f"[score] {key}: within-set AUROC {row['within_auroc']} Brier {row['brier']}{more} "
                                  f"({row['eval_s']} s)", flush=True)
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    (out / "results.md").write_text(markdown(rows, ref))
    figure(rows, ref, out / "learning_curve")
    print(markdown(rows, ref))
    return rows


def best_checkpoints(rows: list[dict]) -> dict[str, dict]:
    """Per run, the checkpoint with the highest validation within-set AUROC (lower Brier breaks ties)."""
    best: dict[str, dict] = {}
    for r in rows:
        b = best.get(r["run"])
        if b is None or (r["within_auroc"], -r["brier"]) > (b["within_auroc"], -b["brier"]):
            best[r["run"]] = r
    return best


def markdown(rows: list[dict], ref: dict) -> str:
    scored = [r for r in rows if r["questions"] == "adapter"]
    rows = [r for r in rows if r["questions"] != "adapter"]
    last = {}
    for r in rows:
        if r["step"] >= last.get(r["run"], {}).get("step", -1):
            last[r["run"]] = r
    best = best_checkpoints(rows)
    lines = ["| questions | clean share | target | layout | scenes | steps | seed | rows seen | within-set AUROC (last) "
             "| Brier (last) | best step | within-set AUROC (best) | Brier (best) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in sorted(last.items(), key=lambda kv: (kv[1]["questions"], -kv[1]["clean_share"], kv[1]["target"],
                                                       kv[1]["layout"], kv[1]["scenes"], kv[1]["seed"])):
        b = best[run]
        lines.append(f"| {r['questions']} | {r['clean_share']:.2f} | {r['target']} | {r['layout']} | {r['scenes']} | "
                     f"{r['steps']} | {r['seed']} | {r['rows_seen']} | {r['within_auroc']:.3f} | {r['brier']:.3f} | "
                     f"{b['step']} | {b['within_auroc']:.3f} | {b['brier']:.3f} | {r['train_s']:.0f} |")
    for r in scored:
        lines.append(f"| adapter {r['run']} | | {r['target']} | {r['layout']} | | {r['steps']} | {r['seed']} | "
                     f"{r['rows_seen']} | {r['within_auroc']:.3f} | {r['brier']:.3f} | | | | |")
    t = ref["internal_T"]
    lines.append(f"| base model, temperature-scaled internal probability | | | | | | | | {t['within_auroc']:.3f} | "
                 f"{t['brier']:.3f} | | | | |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], ref: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csp_utils.analysis import plots

    scored = [r for r in rows if r["questions"] == "adapter"]
    rows = [r for r in rows if r["questions"] != "adapter"]
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    groups = sorted({(r["target"], r["layout"]) for r in rows})
    colors = {g: plt.cm.tab10(i) for i, g in enumerate(groups)}
    shares = sorted({r["clean_share"] for r in rows}, reverse=True)
    styles = dict(zip(shares, ["-", "--", ":", "-."]))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    labelled = set()
    budgets = {}
    for run, rs in sorted(runs.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        g, cs, seed = (rs[0]["target"], rs[0]["layout"]), rs[0]["clean_share"], rs[0]["seed"]
        label = f"target {g[0]}, {g[1]}" + (f", clean {cs:.2f}" if len(shares) > 1 else "")
        # seed 0 draws the curve; further seeds are thin lines of the same colour
        ax.plot([r["rows_seen"] for r in rs], [r["within_auroc"] for r in rs], styles[cs], color=colors[g],
                alpha=0.85 if seed == 0 else 0.45, lw=1.5 if seed == 0 else 0.8, marker="o", ms=3 if seed == 0 else 2,
                label=label if seed == 0 and label not in labelled else None)
        if seed == 0:
            labelled.add(label)
        budgets[rs[-1]["rows_seen"]] = f"{rs[0]['scenes']}:{rs[0]['steps']}"
    for x, text in budgets.items():  # each budget's end, named once (scenes:steps)
        ax.axvline(x, color="grey", lw=0.5, ls=":")
        ax.annotate(text, (x, 0), xycoords=("data", "axes fraction"), fontsize=7, xytext=(2, 3),
                    textcoords="offset points", color="dimgrey")
    for r in scored:
        ax.plot([r["rows_seen"]], [r["within_auroc"]], "kx", ms=7)
        ax.annotate(r["run"], (r["rows_seen"], r["within_auroc"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.axhline(ref["internal_T"]["within_auroc"], color="black", lw=1,
               label="base model: temperature-scaled internal probability")
    ax.axhline(0.70, color="grey", lw=1, ls="--", label="success bar (0.70)")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training rows seen (steps x 16); dotted lines: each budget's end (scenes:steps); thin lines: seeds 1-2")
    ax.set_ylabel("within-set AUROC, validation (mean of 6 sets)")
    ax.set_title("Grounded CSP learning curve (validation split of CSP scenes)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    plots.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
