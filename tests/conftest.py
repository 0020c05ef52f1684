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
