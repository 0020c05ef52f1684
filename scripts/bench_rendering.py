"""How fast does the object world render? ``scenes.make_scenes`` for 500 scenes with the shape
templates cached (the normal case: every later scene reuses a category's alpha at a given side)
and with the cache emptied before every scene (each shape's supersampled inside test computed
afresh), plus the even-odd polygon test over a 256 x 256 grid against matplotlib's
point-by-point ``Path.contains_points``.

Goal: 500 scenes in under 5 s on a busy two-core host (the bound the test suite once asserted;
it now checks the cache and the polygon test's agreement, see tests/test_scenes.py). Timings
are the best of ``--repeats``.

    .venv/bin/python scripts/bench_rendering.py [--scenes 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np
from matplotlib.path import Path as PolygonPath

from csp_utils.world import scenes as W, rendering


def _best(fn, repeats: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeats))  # the least disturbed by other work


def _uncached(n: int) -> None:
    for i in range(n):
        rendering._template.cache_clear()
        W.make_scene("base", 100_000 + i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    W.make_scenes("base", args.scenes, start=100_000)  # warm the cache
    cached = _best(lambda: W.make_scenes("base", args.scenes, start=100_000), args.repeats)
    uncached = _best(lambda: _uncached(args.scenes), 1)
    print(f"{args.scenes} scenes: {cached:.2f} s cached (goal < 5 s: {'met' if cached < 5 else 'NOT met'}), "
          f"{uncached:.2f} s with no cache ({uncached / cached:.1f}x)")
    u, v = np.random.default_rng(0).uniform(-1, 1, (2, 256, 256))
    points, corners = np.column_stack([u.ravel(), v.ravel()]), rendering._star_points()
    grid = _best(lambda: rendering._polygon(u, v, corners), args.repeats)
    pointwise = _best(lambda: PolygonPath(corners).contains_points(points), args.repeats)
    print(f"star inside test on 256 x 256: {1e3 * grid:.2f} ms vectorised, {1e3 * pointwise:.2f} ms matplotlib")


if __name__ == "__main__":
    main()
