"""Stage keys and markers: digests of outputs, notebooks, the package and the base model;
``markers/<stage>.json`` (key and output digests: a match means "skip") and
``markers/<stage>.running.json`` (an interrupted stage: only the same key resumes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


from csp_utils.core.paths import PACKAGE
from csp_utils.pipeline.planning import Stage, within
from csp_utils.pipeline.stages import notebook_of
from csp_utils.vlm import models


# ------------------------------------------------------------------ digests and keys
def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _matches(run_dir: Path, rel: str) -> list[Path]:
    if "*" in rel:
        return sorted(run_dir.glob(rel))
    path = run_dir / rel
    return [path] if path.exists() or path.is_symlink() else []


def _derived_cache(path: Path) -> bool:
    """``datasets`` writes ``cache-<fingerprint>.arrow`` beside a saved dataset that a reader
    maps or filters: the reader's derived files, not a change to the dataset."""
    return path.name.startswith("cache-") and path.suffix == ".arrow"


def output_digest(run_dir: Path, rel: str) -> str | None:
    """A file's sha256; a folder's (or a pattern's) over its files' relative paths and digests;
    None when nothing is there."""
    return digest_and_files(run_dir, rel)[0]


def digest_and_files(run_dir: Path, rel: str) -> tuple[str | None, dict | None]:
    """The output's digest and, for a folder or pattern, each file's (relative path -> digest),
    recorded so that a damaged input can be named file by file."""
    found = _matches(run_dir, rel)
    if not found:
        return None, None
    if found == [run_dir / rel] and found[0].is_file():
        return _file_hash(found[0]), None
    files = sorted(f for p in found for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file() and not _derived_cache(f))
    pairs = [(str(f.relative_to(run_dir)), _file_hash(f)) for f in files]
    return hash_json(pairs), dict(pairs)


def code_digest(notebook: Path) -> str:
    """The notebook's code cells only: markdown edits and saved outputs change nothing."""
    cells = json.loads(notebook.read_text())["cells"]
    return hash_json(["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                  for c in cells if c["cell_type"] == "code"])


def package_digest() -> str:
    """Every module of the package: a stage runs whatever it imports, so any source change counts."""
    return hash_json([(str(p.relative_to(PACKAGE)), _file_hash(p)) for p in sorted(PACKAGE.rglob("*.py"))])


def model_fingerprint(base_model) -> str:
    """What identifies the base model's weights, so that a retrained or replaced model
    invalidates every stage that loads it: the checksum in ``csp_meta.json`` (the embedded
    default), else the names, sizes and mtimes of a local folder's weight and config files,
    else the hub id."""
    name = str(base_model)
    if name == models.EMBEDDED and not (models.default_model_dir() / "model.safetensors").exists():
        # never the bare name: a stage keyed on it would start a notebook that cannot load the model
        raise models.MissingEmbeddedModelError(models.missing_embedded_model_message())
    folder = (models.default_model_dir() if name == models.EMBEDDED else models.shipped_model_path(name)
              if name in models.SHIPPED_MODELS else Path(name).expanduser())
    meta = folder / "csp_meta.json"
    if meta.exists():
        return json.loads(meta.read_text()).get("sha256") or _file_hash(meta)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
        return hash_json([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return name  # a hub id (or an embedded model not built yet)


def fingerprint_or_none(base_model) -> str | None:
    """For the manifest: a run of stages that load no model does not need it."""
    try:
        return model_fingerprint(base_model)
    except FileNotFoundError:
        return None


def key_parts(stage: Stage, package: str, markers: dict[str, dict | None]) -> dict:
    """What the stage's result depends on; ``markers``: the current marker of each stage it reads."""
    parts = {"parameters": hash_json(stage.parameters), "notebook": code_digest(notebook_of(stage.name)),
             "package": package,
             "inputs": hash_json({name: [(m or {}).get("key"), (m or {}).get("produced")]
                              for name, m in sorted(markers.items())})}
    if stage.uses_model:
        parts["model"] = model_fingerprint(stage.parameters.get("base_model", "embedded"))
    return parts


# ------------------------------------------------------------------ markers
def marker_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "markers" / f"{stage}.json"


def running_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "markers" / f"{stage}.running.json"


def read_marker(run_dir: Path, stage: str) -> dict | None:
    path = marker_path(run_dir, stage)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # a killed driver leaves the old file or the new one


def changed_outputs(run_dir: Path, marker: dict) -> list[str]:
    return [rel for rel, digest in marker.get("outputs", {}).items() if output_digest(run_dir, rel) != digest]


def stage_state(run_dir: Path, stage: Stage, key: str, parts: dict) -> tuple[str, str]:
    """("done" | "resume" | "fresh", why)."""
    marker = read_marker(run_dir, stage.name)
    if marker and marker.get("key") == key:
        changed = changed_outputs(run_dir, marker)
        if not changed:
            return "done", "up to date"
        return "fresh", "outputs changed or missing: " + ", ".join(changed)
    running = running_path(run_dir, stage.name)
    if running.exists() and json.loads(running.read_text()).get("key") == key:
        return "resume", "resuming an interrupted run with the same key"
    if marker:
        old = marker.get("key_parts", {})
        return "fresh", "changed: " + (", ".join(k for k in parts if old.get(k) != parts[k]) or "key")
    if running.exists():
        return "fresh", "an interrupted run had another key"
    return "fresh", "not run yet"


def changed_files(run_dir: Path, marker: dict, rel: str) -> list[str]:
    """The files of a folder output that differ from, are missing from, or were added since its
    marker's record (an old marker without per-file digests names the folder)."""
    recorded = (marker.get("files") or {}).get(rel)
    if recorded is None:
        return [rel]
    now = digest_and_files(run_dir, rel)[1] or {}
    return sorted(f for f in recorded.keys() | now.keys() if recorded.get(f) != now.get(f)) or [rel]


def check_inputs(run_dir: Path, stage: Stage) -> None:
    """What the stage reads still holds what its writer recorded; checked before the stage's
    own outputs are removed, so that a refused run loses nothing."""
    for name in stage.inputs:
        marker = read_marker(run_dir, name)
        if marker is None:
            raise StageFailed(stage.name, f"it reads the outputs of {name}, which has not finished in this run "
                              f"folder; run {name} first (nothing was removed)", None)
        read = [rel for rel in marker.get("outputs", {})
                if any(within(rel, path) or within(path, rel) for path in stage.reads)]
        damaged = [f for rel in changed_outputs(run_dir, marker) if rel in read for f in changed_files(run_dir, marker, rel)]
        if damaged:
            raise StageFailed(stage.name, f"its input {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''} "
                              f"changed or went missing since {name} finished; nothing was removed. Rebuild it "
                              f"with {name} (e.g. --only {name} {stage.name})", None)


def clear_outputs(run_dir: Path, stage: Stage) -> None:
    """Remove what the stage wrote before, so a rerun never builds on another key's files."""
    for rel in stage.outputs + stage.scratch:
        for path in _matches(run_dir, rel):
            print(f"[study] {stage.name}: removing old {path.relative_to(run_dir)}", flush=True)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


class StageFailed(Exception):
    def __init__(self, stage: str, error: str, notebook: Path | None):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error, self.notebook = stage, error, notebook

    def __reduce__(self):  # crosses the process boundary of a parallel run
        return StageFailed, (self.stage, self.error, self.notebook)


def os_problem(err: OSError) -> str:
    """``path: cause`` of a failed file operation, in one line."""
    path = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
    return f"{path}: {err.strerror or err}" if path else f"{err.strerror or err}"
