"""Where the package, its vendored data and the repository around it lie."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
DATA = PACKAGE / "data"  # vendored benchmark files, vocabularies and the shipped models
REPO = PACKAGE.parent
