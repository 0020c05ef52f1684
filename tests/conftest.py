"""Shared fixtures. Tests write only into temporary folders, never into the repository."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BENCHMARKS = Path(os.environ.get("CSP_BENCHMARKS", SHARED / "benchmarks"))


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not BENCHMARKS.exists():
        pytest.fail(f"official benchmark files not found at {BENCHMARKS}; set CSP_BENCHMARKS")
    return BENCHMARKS


@pytest.fixture(scope="session")
def tiny_vlm():
    """A randomly initialised tiny LLaVA + processor (fast; shared by the session)."""
    from csp_utils import models

    return models.build_tiny_vlm(models.TinyVLMConfig())
