"""Shared fixtures. Tests write only into temporary folders, never into the repository."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The official POPE / AMBER files vendored in the package (``pope/``, ``amber/``)."""
    from csp_utils.world import benchmarks

    return benchmarks.BENCHMARK_DIR


@pytest.fixture(scope="session")
def tiny_vlm():
    """A randomly initialised tiny LLaVA + processor (fast; shared by the session)."""
    from csp_utils.vlm.embedded import build

    return build.build_tiny_vlm(build.TinyVLMConfig())


@pytest.fixture(scope="module")
def tiny():
    """A random tiny LLaVA with LLaVA-1.5's image-first layout, so that the shared-prefix
    shortcut (taken for image-first templates only) is exercised; one per test module."""
    from csp_utils.vlm.embedded import build

    return build.build_tiny_vlm(build.TinyVLMConfig(image_first=True))


@pytest.fixture(scope="module")
def tiny_text_first():
    """The embedded default's layout (question before the image): no shared prefix; one per
    test module (``tiny_vlm`` is the session's)."""
    from csp_utils.vlm.embedded import build

    return build.build_tiny_vlm(build.TinyVLMConfig())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): tiny models gain nothing from threads, and
    on a shared 2-core machine spinning OpenMP threads make each tiny matmul many times slower.
    Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
