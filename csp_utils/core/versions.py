"""Versions of the packages a result depends on, recorded beside it (run manifests, adapters,
the embedded model's meta)."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy", "papermill")


def package_versions(names=PACKAGES) -> dict:
    """``{"python": ..., name: version or None}``; None for a package that is not installed."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
