"""Speed of answer + confidence elicitation: the naive loop against the fast path.

Same model, same questions, same images:

* naive loop: one question at a time, ``generate`` the answer, then ``generate`` the
  confidence reply (third person) and parse it;
* fast path: answers generated in batches (left padding, KV cache) and the confidence
  read in a single pass (the prompt and options 0%..100% as a prefix tree, one forward).

It prints both throughputs (questions/s), their ratio (goal: >= 10x on the embedded
default) and how often the two paths gave the same answer (they should always).

    python scripts/bench_elicitation.py [--model embedded|PATH] [--n 256] [--batch-size 128]
    python scripts/bench_elicitation.py --capabilities default avx2 avx512

Beside the ratio it prints where each path spends its time (vision tower, language model,
processor and text work, the rest), the CPUs this process may use with their SMT siblings,
and torch's CPU capability; ``--capabilities`` reruns the script once per ATen kernel set
(``ATEN_CPU_CAPABILITY``) and prints the ratios side by side, so that a host where the ratio
falls shows which part and which kernels lose.

The model is the embedded default when it has been built (``models.default_model_dir()``),
else a random tiny LLaVA of the same architecture; the output says which.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def cpu_topology() -> str:
    """The CPUs this process may use and how many physical cores they are (Linux sysfs):
    two SMT siblings share one core's vector units, so a 2-thread batched path gains little."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return f"{os.cpu_count()} CPUs (affinity unknown)"
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            return f"{len(cpus)} CPUs usable (cores unknown)"
    smt = "SMT off" if len(cores) == len(cpus) else "SMT siblings share cores"
    return f"{len(cpus)} CPUs usable on {len(cores)} physical cores ({smt})"


class PartTimer:
    """Exclusive wall time per part: a call inside a timed call counts for its own part
    only. Parts are model submodules (forward hooks) and module functions (wrapped)."""

    def __init__(self, clock=time.perf_counter):
        self.total, self.stack, self.undo, self.clock = {}, [], [], clock

    def _enter(self, part):
        self.stack.append([part, self.clock(), 0.0])

    def _exit(self):
        part, t0, inner = self.stack.pop()
        dt = self.clock() - t0
        self.total[part] = self.total.get(part, 0.0) + dt - inner
        if self.stack:
            self.stack[-1][2] += dt

    def module(self, part, module):
        self.undo.append(module.register_forward_pre_hook(lambda *a: self._enter(part)).remove)
        self.undo.append(module.register_forward_hook(lambda *a: self._exit()).remove)

    def function(self, part, owner, name):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self._enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        setattr(owner, name, timed)
        self.undo.append(lambda: setattr(owner, name, fn))

    def remove(self):
        for u in reversed(self.undo):
            u()
        self.undo = []


def breakdown(model, run) -> dict:
    """Seconds per part of one ``run()``: vision tower, language model, processor and
    text (chat template, tokenizer, pixels), and the rest (total minus those)."""
    from csp_utils.vlm import engine
    from csp_utils.evaluate import evaluation as ev

    timer = PartTimer()
    found = {}
    for name, mod in model.named_modules():
        for part, suffix in (("vision tower", "vision_tower"), ("language model", "language_model")):
            if part not in found and name.split(".")[-1] == suffix:
                found[part] = mod
    for part, mod in found.items():
        timer.module(part, mod)
    for owner, name in ((engine, "encode"), (engine, "chat_texts"), (ev, "chat_texts"),
                        (engine, "_tokenize_expanded"), (engine, "_batched_pixels")):
        timer.function("processor and text", owner, name)
    t0 = time.perf_counter()
    try:
        run()
    finally:
        timer.remove()
    total = time.perf_counter() - t0
    parts = {p: timer.total.get(p, 0.0) for p in ("vision tower", "language model", "processor and text")}
    parts["rest"] = total - sum(parts.values())
    return {"total": total, **parts}


def show_breakdown(label: str, parts: dict, n: int) -> None:
    text = ", ".join(f"{k} {1000 * v / n:.2f} ({v / parts['total']:.0%})" for k, v in parts.items() if k != "total")
    print(f"  {label} ms/question: total {1000 * parts['total'] / n:.2f}; {text}")


def compare_capabilities(args) -> list[dict]:
    """This script once per ATen CPU capability in ``args.capabilities`` (a fresh process each:
    torch reads ATEN_CPU_CAPABILITY when it loads) with the other options of ``args``, its
    ratio lines side by side."""
    rest = ["--model", args.model, "--n", str(args.n), "--batch-size", str(args.batch_size),
            "--repeats", str(args.repeats), *(["--threads", str(args.threads)] if args.threads else [])]
    results = []
    for cap in args.capabilities:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        proc = subprocess.run([sys.executable, __file__, *rest, "--json"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ATEN_CPU_CAPABILITY={cap}: the run failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({"requested": cap, **out})
        print(f"ATEN_CPU_CAPABILITY={cap:8s} -> {out['capability']:8s} ratio {out['ratio']:5.1f}x "
              f"(range {min(out['ratios']):.1f}-{max(out['ratios']):.1f}x); naive {out['naive_qps']:.1f}, "
              f"fast {out['fast_qps']:.1f} questions/s; same answers {out['same_answers']:.0%}; {out['threads']} threads, "
              f"{out['cpus']}", flush=True)
        for path in ("naive", "fast"):
            show_breakdown(path, out[f"{path}_parts"], out["n"])
    return results


def load_model(name: str):
    from csp_utils.vlm import models
    from csp_utils.vlm.embedded import build

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
    from csp_utils.world import benchmarks

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
    ap.add_argument("--capabilities", nargs="+", choices=("default", "avx2", "avx512"),
                    help="rerun once per ATen CPU capability (fresh processes) and compare")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args(argv)
    if args.capabilities:
        return {"capabilities": compare_capabilities(args)}

    import torch

    from csp_utils.vlm import engine
    from csp_utils.evaluate import evaluation as ev

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor, label = load_model(args.model)
    bench, items, images = questions(args.n)
    parse = ev.answer_parser(bench)
    config = ev.EvalConfig(framings=("third",), readouts=("single_pass",), batch_size=args.batch_size,
                           progress=False)
    capability, cpus = torch.backends.cpu.get_cpu_capability(), cpu_topology()
    print(f"model: {label}")
    print(f"questions: {len(items)} from {bench.name}; device {next(model.parameters()).device}, "
          f"{torch.get_num_threads()} threads, CPU capability {capability}; answer max_new_tokens={config.max_new_tokens}, "
          f"confidence max_new_tokens={config.confidence_max_new_tokens}, {len(config.options)} options; "
          f"{args.repeats} alternating runs per path")
    print(f"CPUs: {cpus}")

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
    # one more run of each path with its parts timed (hooks and wrappers cost a little, so
    # these runs are not the timed ones)
    parts = {"naive": breakdown(model, naive_loop), "fast": breakdown(model, fast_path)}
    print("where the time goes (one more run of each path):")
    for path in ("naive", "fast"):
        show_breakdown(path, parts[path], len(items))
    result = {"naive_qps": q_naive, "fast_qps": q_fast, "ratio": ratio, "ratios": ratios, "same_answers": same,
              "model": label, "n": len(items), "threads": torch.get_num_threads(),
              "capability": capability, "cpus": cpus,
              "naive_parts": parts["naive"], "fast_parts": parts["fast"]}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
