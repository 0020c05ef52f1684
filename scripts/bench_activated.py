"""Speed of an activated adapter (PEFT's aLoRA, ``lora.activation="confidence"``) on the deep
base: today's path against the one that reuses what the base model computed, in one run.

* training: the option loss (soft CE, follow-up layout) with the whole prompt forward and
  backward, against the prompt before the invocation run once without gradient
  (``trainers.option_logliks(split_activated=...)``). Two copies of one adapter take the same
  steps on the same batches, alternately; their losses must stay equal.
* evaluation: the trained adapter, confidence-only as the study evaluates it, with the
  confidence prompts built whole against continuing the answer prompts' KV cache
  (``EvalConfig.continue_answer_cache``). "Rows identical": answers, internal probabilities and
  the argmax option equal, confidences within 1e-6.
* a study's evaluation of ``--adapters`` activated adapters on one base (the deep base's six): the
  first continuing its answer turn and the others taking its answers and building their prompts
  whole, against all of them batch-major on one model, one answer turn per batch that every
  adapter continues (``evaluation.elicit_batch_adapters``, what ``matrix.evaluate_models`` does).

Each ratio is the median of ``--repeats`` paired runs (the two paths alternate, order swapped
each time). Prints three lines:

    evaluation: N.N× faster, rows identical
    training: N.N× faster per step, losses equal
    K adapters batch-major: N.N× faster, rows identical

    python scripts/bench_activated.py [--base-model embedded-deep] [--questions 192] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def world_benchmark(n_questions: int, per_image: int = 6, seed: int = 0):
    """POPE-like questions on world scenes: ``per_image`` questions per image, as POPE asks."""
    import numpy as np

    from csp_utils.world import benchmarks, scenes, language

    rng = np.random.RandomState(seed)
    shots = scenes.make_scenes("eval", -(-n_questions // per_image))
    items = [q for s in shots for q in language.world_questions(s, rng, per_image)][:n_questions]
    by_id = {s.scene_id: s.to_pil() for s in shots}
    return benchmarks.Benchmark("world-bench", "pope", items, by_id.__getitem__, "yes")


def training_batches(processor, bench, n_batches: int, batch_size: int, seed: int = 1):
    """Option-loss batches (follow-up layout) on the benchmark's images: the answer quoted is
    the gold one, the target a random percent (what is learnt does not matter for speed)."""
    import numpy as np

    from csp_utils.train import trainers

    rng = np.random.RandomState(seed)
    collate = trainers.OptionCollator(processor, "follow_up")
    items = bench.items
    batches = []
    for b in range(n_batches):
        rows = [items[(b * batch_size + i) % len(items)] for i in range(batch_size)]
        batches.append(collate([{"image": bench.image_loader(it.image_id), "question": it.question,
                                 "response": it.label.capitalize(), "framing": "third",
                                 "target": int(rng.randint(0, 101))} for it in rows]))
    return batches


def train_steps(model, opt, batches, option_ids, split: bool, first_seed: int) -> list[float]:
    import torch

    from csp_utils.train import trainers
    from csp_utils.vlm import prompts

    losses = []
    model.train()
    for k, batch in enumerate(batches):
        torch.manual_seed(first_seed + k)   # LoRA dropout: the same masks on both paths
        ll = trainers.option_logliks(model, batch, option_ids, split_activated=split)
        loss = trainers.option_losses(ll, batch["targets"], prompts.CONFIDENCE_LEVELS, "soft_ce").mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def evaluate_rows(model, processor, bench, config):
    from csp_utils.evaluate import evaluation

    parse, rows, items = evaluation.answer_parser(bench), [], bench.items
    for s in range(0, len(items), config.batch_size):
        batch = items[s:s + config.batch_size]
        images = [bench.image_loader(it.image_id) for it in batch]
        rows += evaluation.elicit_batch(model, processor, batch, images, config, "bench", parse)
    return rows


def same_rows(a, b) -> bool:
    """Answers, internal probabilities and the argmax option equal, confidences within 1e-6
    (the option log-likelihoods are float32 sums over differently padded keys: last bits)."""
    if len(a) != len(b):
        return False
    exact = ("question_id", "raw_answer", "answer", "internal_prob", "internal_prob_raw", "raw_confidence")
    return all(all(x[k] == y[k] for k in exact) and abs(x["confidence"] - y["confidence"]) <= 1e-6
               for x, y in zip(a, b))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="embedded-deep")
    ap.add_argument("--questions", type=int, default=192, help="questions evaluated per run")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch (the study's)")
    ap.add_argument("--train-batch", type=int, default=16, help="training batch (the preset's)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per path and run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapters", type=int, default=6, help="activated adapters evaluated together")
    args = ap.parse_args(argv)

    import torch
    from peft import get_peft_model

    from csp_utils.evaluate import evaluation
    from csp_utils.train import settings, trainers
    from csp_utils.vlm import engine, models, prompts

    torch.set_num_threads(args.threads)
    base, processor = models.load_vlm(args.base_model, dtype=torch.float32)
    lora = trainers.lora_config(base, settings.LoraSettings(activation="confidence"), processor)
    torch.manual_seed(0)
    split_model = get_peft_model(base, lora)
    whole_model = copy.deepcopy(split_model)
    params = {m: [p for p in m.parameters() if p.requires_grad] for m in (whole_model, split_model)}
    opts = {m: torch.optim.AdamW(params[m], lr=5e-3) for m in params}
    bench = world_benchmark(args.questions)
    batches = training_batches(processor, bench, args.steps * args.repeats, args.train_batch)
    option_ids = engine.option_token_ids(processor, prompts.CONFIDENCE_LEVELS, layout="follow_up")

    train_ratios, losses = [], {True: [], False: []}
    for r in range(args.repeats):
        chunk = batches[r * args.steps:(r + 1) * args.steps]
        took = {}
        for split in ((False, True) if r % 2 == 0 else (True, False)):
            model = split_model if split else whole_model
            took[split], got = timed(lambda: train_steps(model, opts[model], chunk, option_ids, split, r * args.steps))
            losses[split] += got
        train_ratios.append(took[False] / took[True])
    losses_equal = all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(losses[False], losses[True]))

    config = evaluation.EvalConfig(framings=("third",), readouts=("single_pass",), batch_size=args.batch_size,
                                   layout="follow_up", adapter_scope="confidence", progress=False)
    today = dataclasses.replace(config, continue_answer_cache=False)
    split_model.eval()
    eval_ratios, identical = [], True
    for r in range(args.repeats):
        took, rows = {}, {}
        for new in ((False, True) if r % 2 == 0 else (True, False)):
            took[new], rows[new] = timed(lambda: evaluate_rows(split_model, processor, bench, config if new else today))
        eval_ratios.append(took[False] / took[True])
        identical &= same_rows(rows[False], rows[True])

    print(f"evaluation: {statistics.median(eval_ratios):.1f}× faster, rows {'identical' if identical else 'differ'}")
    print(f"training: {statistics.median(train_ratios):.1f}× faster per step, "
          f"losses {'equal' if losses_equal else 'differ'}")

    names = ["default"] + [f"extra{k}" for k in range(1, args.adapters)]
    torch.manual_seed(1)
    for name in names[1:]:   # more activated adapters: the trained one, moved a little
        split_model.add_adapter(name, lora)
        weights = dict(split_model.named_parameters())
        with torch.no_grad():
            for key, p in weights.items():
                if f".{name}." in key:
                    p.copy_(weights[key.replace(f".{name}.", ".default.")] + torch.randn_like(p) * 0.01)
    split_model.eval()
    group_ratios, group_identical = [], True
    for r in range(args.repeats):
        took, rows = {}, {}
        for new in ((False, True) if r % 2 == 0 else (True, False)):
            run = batch_major if new else one_by_one
            took[new], rows[new] = timed(lambda: run(split_model, processor, bench, config, names))
        group_ratios.append(took[False] / took[True])
        group_identical &= all(same_rows(rows[False][n], rows[True][n]) for n in names)
    split_model.set_adapter("default")
    print(f"{args.adapters} adapters batch-major: {statistics.median(group_ratios):.1f}× faster, "
          f"rows {'identical' if group_identical else 'differ'}")
    return {"evaluation": eval_ratios, "training": train_ratios, "rows_identical": identical,
            "losses_equal": losses_equal, "losses": losses, "batch_major": group_ratios,
            "batch_major_identical": group_identical}


def one_by_one(model, processor, bench, config, names) -> dict[str, list[dict]]:
    """Adapter by adapter: the first continues its answer turn, the others take its answers."""
    from csp_utils.evaluate import evaluation

    parse, items, out = evaluation.answer_parser(bench), bench.items, {n: [] for n in names}
    for s in range(0, len(items), config.batch_size):
        batch = items[s:s + config.batch_size]
        images = [bench.image_loader(it.image_id) for it in batch]
        model.set_adapter(names[0])
        first = evaluation.elicit_batch(model, processor, batch, images, config, names[0], parse)
        out[names[0]] += first
        answers = [{k: r[k] for k in evaluation.ANSWER_FIELDS} for r in first]
        for name in names[1:]:
            model.set_adapter(name)
            out[name] += evaluation.elicit_batch(model, processor, batch, images, config, name, parse, answers=answers)
    return out


def batch_major(model, processor, bench, config, names) -> dict[str, list[dict]]:
    """All adapters on each batch: one answer turn, every adapter continuing its cache."""
    from csp_utils.evaluate import evaluation

    parse, items, out = evaluation.answer_parser(bench), bench.items, {n: [] for n in names}
    for s in range(0, len(items), config.batch_size):
        batch = items[s:s + config.batch_size]
        images = [bench.image_loader(it.image_id) for it in batch]
        rows = evaluation.elicit_batch_adapters(model, processor, batch, images, config, [(n, n) for n in names], parse)
        for n in names:
            out[n] += rows[n]
    return out


if __name__ == "__main__":
    main()
