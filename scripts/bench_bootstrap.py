"""How fast is the clustered bootstrap of the evaluation? ``metrics.cluster_bootstrap`` (all
resamples at once: per-cluster sums times the resample counts) against a loop that builds each
resample's rows and computes ECE (10 and 15 bins), Brier and AUROC on them.

The size of one evaluation cell of the study: 6,000 questions, 6 per image, 1,000 resamples;
verbalized confidences (11 values) and continuous ones (internal read-outs). Goal: under 5 s per
call on a busy two-core host (the bound the test suite once asserted; it now checks that the
fast path equals the loop, see tests/test_metrics.py). Timings are the best of ``--repeats``.

    .venv/bin/python scripts/bench_bootstrap.py [--n-boot 1000] [--loop-boot 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from csp_utils.core import metrics as M


def _best(fn, repeats: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeats))  # the least disturbed by other work


def _loop(conf, correct, images, n_boot: int) -> None:
    n_images = int(images.max()) + 1
    for drawn in M.resample_counts(n_images, n_boot, seed=0):
        rows = np.repeat(np.arange(conf.size), drawn[images])
        c, y = conf[rows], correct[rows]
        M.ece(c, y), M.ece(c, y, 15), M.brier(c, y), M.auroc(c, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--loop-boot", type=int, default=100, help="resamples the loop runs (scaled to --n-boot)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = np.repeat(np.arange(args.n // 6), 6)
    correct = (rng.random(args.n) < 0.8).astype(float)
    print(f"{args.n} rows, {args.n // 6} images, {args.n_boot} resamples")
    for kind, conf in (("verbalized", rng.choice(np.arange(11) / 10, args.n)), ("continuous", rng.random(args.n))):
        fast = _best(lambda: M.cluster_bootstrap(conf, correct, images, n_boot=args.n_boot), args.repeats)
        loop = _best(lambda: _loop(conf, correct, images, args.loop_boot), 1) * args.n_boot / args.loop_boot
        print(f"{kind:>10}: cluster_bootstrap {fast:.3f} s (goal < 5 s: {'met' if fast < 5 else 'NOT met'}), "
              f"loop over resamples {loop:.1f} s (scaled), loop / fast = {loop / fast:.1f}x")


if __name__ == "__main__":
    main()
