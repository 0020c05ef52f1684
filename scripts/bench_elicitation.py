"""Speed of answer + confidence elicitation: the naive loop against the fast path.

Same model, same questions, same images:

* naive loop: one question at a time, ``generate`` the answer, then ``generate`` the
  confidence reply (third person) and parse it;
* fast path: answers generated in batches (left padding, KV cache) and the confidence
  read in a single pass (the prompt and options 0%..100% as a prefix tree, one forward).

It prints both throughputs (questions/s), their ratio (goal: >= 10x on the embedded
default) and how often the two paths gave the same answer (they should always).

    python scripts/bench_elicitation.py [--model embedded|PATH] [--n 256] [--batch-size 128]

The model is the embedded default when it has been built (``models.default_model_dir()``),
else a random tiny LLaVA of the same architecture; the output says which.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_model(name: str):
    from csp_utils import models
    from csp_utils.embedded import build

    if name != "embedded":
        model, processor = models.load_vlm(name)
        return model, processor, name
    path = models.default_model_dir()
    if (path / "model.safetensors").exists():
        model, processor = models.load_vlm("embedded")
        return model, processor, f"embedded default (trained, {path})"
    model, processor = build.build_tiny_vlm(build.TinyVLMConfig())
    return model, processor, f"random tiny LLaVA (no embedded default at {path}; same architecture, untrained)"


def questions(n: int):
    """World POPE questions (real object scenes) when the world modules are there."""
    from csp_utils import benchmarks

    scenes = benchmarks.pope_scenes(max(1, (n + 5) // 6))
    bench = benchmarks.build_world_pope(scenes, "random")
    items = bench.items[:n]
    return bench, items, [bench.image_loader(it.image_id) for it in items]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="'embedded' (default) or a model folder / hub id")
    ap.add_argument("--n", type=int, default=256, help="questions timed on each path")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; on a shared machine 1 avoids oversubscription)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per path, alternating naive and fast")
    args = ap.parse_args(argv)

    import torch

    from csp_utils import engine
    from csp_utils import evaluation as ev

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor, label = load_model(args.model)
    bench, items, images = questions(args.n)
    parse = ev.answer_parser(bench)
    config = ev.EvalConfig(framings=("third",), readouts=("single_pass",), batch_size=args.batch_size,
                           progress=False)
    print(f"model: {label}")
    print(f"questions: {len(items)} from {bench.name}; device {next(model.parameters()).device}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; answer max_new_tokens={config.max_new_tokens}, "
          f"confidence max_new_tokens={config.confidence_max_new_tokens}, {len(config.options)} options; "
          f"{args.repeats} alternating runs per path")

    # warm up both paths (first calls pay for lazy imports and allocator growth)
    ev.elicit_naive(model, processor, items[0], images[0], config, parse)
    ev.elicit_batch(model, processor, items[:2], images[:2], config, "bench", parse)

    def naive_loop():
        return [ev.elicit_naive(model, processor, it, im, config, parse) for it, im in zip(items, images)]

    def fast_path():
        option_ids = engine.option_token_ids(processor, config.options)
        yn = engine.yes_no_tokens(processor)
        rows = []
        for s in range(0, len(items), config.batch_size):
            rows += ev.elicit_batch(model, processor, items[s:s + config.batch_size], images[s:s + config.batch_size],
                                    config, "bench", parse, option_ids, yn)
        return rows

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    # the two paths alternate, so a burst of load from elsewhere hits both alike; each
    # path's best time gives its throughput, the median of the paired ratios the speed-up
    t_naive, t_fast = [], []
    for _ in range(args.repeats):
        naive, t = timed(naive_loop)
        t_naive.append(t)
        fast, t = timed(fast_path)
        t_fast.append(t)
    ratios = sorted(a / b for a, b in zip(t_naive, t_fast))
    ratio = ratios[len(ratios) // 2]

    same = sum(a["raw_answer"] == b["raw_answer"] for a, b in zip(naive, fast)) / len(items)
    parsed = sum(r["confidence"] is not None for r in naive) / len(items)
    q_naive, q_fast = len(items) / min(t_naive), len(items) / min(t_fast)
    print(f"naive loop : {q_naive:8.2f} questions/s  (best {min(t_naive):.2f} s; generated confidence parsed "
          f"for {parsed:.0%})")
    print(f"fast path  : {q_fast:8.2f} questions/s  (best {min(t_fast):.2f} s; batch {config.batch_size}, single pass)")
    print(f"ratio      : {ratio:8.1f}x  (median of {len(ratios)} paired runs, range {ratios[0]:.1f}-{ratios[-1]:.1f}x; "
          f"goal >= 10x)")
    print(f"same answers on both paths: {same:.0%}")
    return {"naive_qps": q_naive, "fast_qps": q_fast, "ratio": ratio, "ratios": ratios, "same_answers": same,
            "model": label}


if __name__ == "__main__":
    main()
