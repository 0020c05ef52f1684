"""Speed of a confidence-only adapter's evaluation with the answer turn generated or taken
from another confidence-only adapter's rows (``evaluation.evaluate(answers_from=...)``).

Both adapters are evaluated from the start on the first ``--n`` questions of each set, the
second one then again, alternately with and without the first one's answers. Every row of
every evaluation must be the same with and without them; with ``--compare`` it must also
equal the committed row of the same question in ``RUN_DIR/results/matrix``.

    python scripts/bench_answer_reuse.py RUN_DIR --models "grounded@s0=sft@g0" "grounded@s1=sft@g1" \
        [--sets pope-random amber-existence transfer-blur] [--n 192] [--repeats 2] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--models", nargs=2, required=True, help="source and timed adapter (NAME or LABEL=ADAPTER)")
    ap.add_argument("--base-model", default="embedded")
    ap.add_argument("--sets", nargs="+", default=["pope-random", "amber-existence", "transfer-blur"])
    ap.add_argument("--n", type=int, default=192, help="questions per set (from the start)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="rows must equal the committed run's")
    args = ap.parse_args(argv)

    import torch

    from csp_utils.evaluate import evaluation
    from csp_utils.vlm import models
    from csp_utils.evaluate import matrix, suites

    torch.set_num_threads(args.threads)
    suite = suites.build_suite(suites.SuiteConfig(), args.sets)
    for bench in suite.values():
        bench.items = bench.items[:args.n]
    config = evaluation.EvalConfig(framings=["third"], readouts=["single_pass"], batch_size=args.batch_size,
                                   progress=False)
    source, timed = matrix.model_specs(args.run_dir, args.base_model, args.models)
    out = Path(tempfile.mkdtemp(prefix="answer_reuse_"))
    try:
        matrix.evaluate_models([source, timed], suite, out / "matrix", config)

        def committed(name, set_):
            ids = {it.question_id for it in suite[set_].items}
            path = args.run_dir / "results" / "matrix" / name / f"{set_}.jsonl"
            return [line for line in open(path) if json.loads(line)["question_id"] in ids]

        def check(name, set_, path):
            if args.compare and open(path).readlines() != committed(name, set_):
                raise SystemExit(f"{name} {set_}: rows differ from the committed run's")

        for spec in (source, timed):
            for s in args.sets:
                check(spec.name, s, matrix.results_path(out / "matrix", spec.name, s))
        model, processor = models.load_vlm(timed.base_model, adapter=timed.adapter)
        cfg = evaluation.config_for_adapter(config, timed.adapter, timed.adapter_scope, timed.layout)
        if cfg.adapter_scope != "confidence":
            raise SystemExit(f"{timed.name} is not a confidence-only adapter: it answers for itself")
        times = {"generated": [], "taken": []}
        for rep in range(args.repeats):
            for mode in times:
                total, rows = 0.0, []
                for s in args.sets:
                    src = (matrix.results_path(out / "matrix", source.name, s), source.name) if mode == "taken" else None
                    t = time.perf_counter()
                    path = evaluation.evaluate(model, processor, suite[s], out / f"{mode}{rep}" / f"{s}.jsonl",
                                               timed.name, cfg, answers_from=src)
                    total += time.perf_counter() - t
                    check(timed.name, s, path)
                    rows.append(path.read_bytes())
                times[mode].append((total, rows))
                print(f"run {rep}: answer turn {mode}: {total:.2f} s for {args.n * len(args.sets)} questions")
        same = all(r == times["generated"][0][1] for mode in times for _, r in times[mode])
        ratios = [g / t for (g, _), (t, _) in zip(times["generated"], times["taken"])]
        print(f"rows identical with and without taken answers: {same}"
              + (" (and equal to the committed run's)" if args.compare else ""))
        print("speed-up (generated / taken) per run: " + ", ".join(f"{r:.2f}x" for r in ratios))
        if not same:
            raise SystemExit("rows differ with and without taken answers")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
