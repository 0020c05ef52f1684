"""Plain helpers the tests share (importable: pytest puts tests/ on sys.path; the
``accelerate launch`` script of test_evaluation puts it there itself)."""

import numpy as np
from PIL import Image

from csp_utils.world.benchmarks import Benchmark
from csp_utils.world.schema import QAItem

QUESTIONS = [
    "Is there a circle in the image?",
    "Is the large red square left of the small blue star in the image?",
    "Is there a star?",
    "Is there a green triangle touching the yellow circle in this image?",
    "Are there two squares?",
]


def make_benchmark(n=10, family="pope", seed=0):
    """``n`` questions on 4 random images of different heights, labels in a fixed pattern."""
    rng = np.random.default_rng(seed)
    images = {f"img{i}": Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8))
              for i in range(4)}
    items = [QAItem(f"q{i:03d}", f"img{i % 4}", QUESTIONS[i % len(QUESTIONS)], "yes" if i % 3 else "no",
                    f"{family}-test", "existence", []) for i in range(n)]
    return Benchmark(f"{family}-test", family, items, lambda k: images[k], "yes" if family == "pope" else "no")


def bench_images(bench, items):
    """The images of ``items``, in order, as the benchmark loads them."""
    return [bench.image_loader(it.image_id) for it in items]


def noise_images(n, hw=(64, 64), seed=1):
    """``n`` RGB images of uniform noise."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for _ in range(n)]
