"""The study driver: run the ordered notebooks with papermill into one run folder.

    python -m csp_utils.study params/default.yaml            # the main study
    python -m csp_utils.study params/smoke.yaml --name smoke  # minutes
    python -m csp_utils.study params/default.yaml --only 07_figures

A params YAML holds global parameters (``base_model``, ``seed``, ...) passed to every
notebook and a ``stages`` mapping of per-notebook parameters. A stage key ``NAME@TAG`` runs
notebook ``NAME`` again with other parameters (e.g. ``03_train_sft@s1`` for a second seed). Each finished stage leaves
``markers/<stage>.json`` with the hash of its parameters, its notebook and the markers of the
stages before it, starting from the base model's identity (:func:`model_fingerprint`); a rerun skips stages whose marker matches and resumes from the first that
does not. A failing notebook stops the chain; its executed copy is kept and the error shown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy", "papermill")


def load_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"params file {path} not found; see params/ for examples")
    params = yaml.safe_load(path.read_text()) or {}
    if "stages" not in params or not isinstance(params["stages"], dict):
        raise ValueError(f"{path}: needs a 'stages' mapping of notebook name -> parameters")
    for stage in params["stages"]:
        if not notebook_of(stage).exists():
            raise ValueError(f"{path}: stage {stage!r} has no notebook {notebook_of(stage)}")
    return params


def notebook_of(stage: str) -> Path:
    """``03_train_sft@s1`` -> notebooks/03_train_sft.ipynb."""
    return NOTEBOOKS / f"{stage.split('@')[0]}.ipynb"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage_parameters(params: dict, stage: str, run_dir: Path) -> dict:
    """Global parameters, then the stage's own; ``run_dir`` always points at the run folder."""
    glob = {k: v for k, v in params.items() if k not in ("stages", "name")}
    return {**glob, **(params["stages"][stage] or {}), "run_dir": str(run_dir)}


def model_fingerprint(base_model) -> str:
    """What identifies the base model's weights, so that a retrained or replaced model
    invalidates every stage: the checksum in ``csp_meta.json`` (the embedded default), else
    the names, sizes and mtimes of a local folder's weight and config files, else the hub id."""
    from csp_utils import models

    name = str(base_model)
    folder = models.default_model_dir() if name == models.EMBEDDED else Path(name).expanduser()
    meta = folder / "csp_meta.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("sha256") or _file_hash(meta)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
        return _hash([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return name  # a hub id (or an embedded model not built yet)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    """The host, recorded because float results depend on it: torch picks its CPU kernels by
    instruction set (AVX2 vs AVX-512), so the same code and seed give results that agree to
    float error, not byte for byte, across machines."""
    import os

    import torch

    try:  # the model name is in /proc/cpuinfo on Linux; platform.processor() is often empty there
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or None
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_study(params_path: str | Path, name: str | None = None, runs_root: str | Path = "runs",
              only: list[str] | None = None, force: bool = False, log_output: bool = False,
              overrides: dict | None = None) -> Path:
    """Run the chain; ``overrides`` replace global parameters (e.g. ``{"base_model": path}``)."""
    import papermill as pm

    params = load_params(params_path)
    params.update(overrides or {})
    name = name or params.get("name") or Path(params_path).stem
    run_dir = (Path(runs_root) / name).resolve()
    (run_dir / "markers").mkdir(parents=True, exist_ok=True)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(name=name, params=params, params_hash=_hash(params), git_commit=git_commit(),
                    packages=package_versions(), machine=machine_info())
    manifest.setdefault("timings_s", {})

    # chain hashes so a changed early stage invalidates every later one; the chain starts
    # from the base model's identity so that new weights invalidate everything
    upstream = model_fingerprint(params.get("base_model", "embedded"))
    manifest["base_model_fingerprint"] = upstream
    for stage in params["stages"]:
        notebook = notebook_of(stage)
        parameters = stage_parameters(params, stage, run_dir)
        key = _hash({"parameters": parameters, "notebook": _file_hash(notebook), "upstream": upstream})
        upstream = key
        marker = run_dir / "markers" / f"{stage}.json"
        selected = only is None or stage in only
        if not selected or (not force and marker.exists() and json.loads(marker.read_text()).get("hash") == key):
            print(f"[study] {stage}: {'skipped (up to date)' if selected else 'not selected'}")
            continue
        marker.unlink(missing_ok=True)
        out_nb = run_dir / "notebooks" / f"{stage}.ipynb"
        print(f"[study] {stage}: running -> {out_nb}", flush=True)
        t0 = time.time()
        try:
            pm.execute_notebook(str(notebook), str(out_nb), parameters=parameters, cwd=str(REPO),
                                progress_bar=False, log_output=log_output, kernel_name="python3")
        except pm.PapermillExecutionError as err:
            manifest["failed"] = {"stage": stage, "error": f"{err.ename}: {err.evalue}", "notebook": str(out_nb)}
            manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
            raise SystemExit(
                f"[study] stage {stage} failed: {err.ename}: {err.evalue}\n"
                f"        executed copy kept at {out_nb}"
            ) from None
        seconds = round(time.time() - t0, 1)
        manifest["timings_s"][stage] = seconds
        manifest.pop("failed", None)
        marker.write_text(json.dumps({"stage": stage, "hash": key, "seconds": seconds, "parameters": parameters}, indent=2))
        manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
        print(f"[study] {stage}: done in {seconds:.0f} s", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, default=str))
    return run_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?", default=str(REPO / "params" / "default.yaml"))
    ap.add_argument("--name", help="run folder name under --runs-root (default: the params' name)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--only", nargs="*", help="run only these stages (others keep their markers)")
    ap.add_argument("--force", action="store_true", help="rerun stages even when their marker matches")
    ap.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override global parameters, e.g. --set base_model=/path/to/model (values are YAML)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    run_dir = run_study(args.params, args.name, args.runs_root, args.only, args.force, args.log_output, overrides)
    print(f"[study] run folder: {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
