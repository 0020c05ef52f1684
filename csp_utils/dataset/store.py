"""The resumable sharded dataset store both builders write through.

A builder hands over its rows chunk by chunk (:class:`Chunk`: the ids of the source samples it
covers and a function that makes its rows) and a finalisation of the merged rows; the store
does the rest, the same way for the paper's perturbed rows and the grounded rows.

On disk (``out_dir``)::

    shards/shard-00000/    while building, one per chunk: ``data/`` (``Dataset.save_to_disk``;
                           absent when the chunk has no rows) and ``shard_stats.json`` (counts,
                           digest of the sample ids, seconds, and the sha256 of every file under
                           ``data/``); removed once the merged dataset is complete
    state.json             config hash and progress (rewritten atomically after each shard)
    dataset/               the merged dataset (the shards concatenated in order, then
                           finalised), with ``csp_sha256.json``: the sha256 of each of its files
    build_report.json      the builder's report, with the dataset's sha256 and the time taken

A shard becomes visible only by an atomic rename of a finished folder, so a killed build
leaves either a whole shard or none. Rerun with the same config, the build checks that the
source still yields the finished shards' samples (by their ids) and goes on after them; a
folder built with another config is refused (:class:`ConfigMismatchError`).

Damaged files are never used. Every finished shard's files are checked against the digests
recorded when it was written, on resuming and again before merging; a shard that fails (a
changed byte, a truncated or missing file, unreadable stats) is rebuilt from the source, with
a printed line naming it, together with the shards after it (shards are built in order). A
shard still damaged after one rebuild is refused with :class:`DamagedDataError`. The merged
dataset is checked whenever it is loaded (:func:`load_merged`); a build on a folder whose
merged copy is damaged rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SHARD_PREFIX = "shard-"
DIGESTS_FILE = "csp_sha256.json"  # in the merged dataset folder: sha256 of each of its files
EMPTY_FILE = "EMPTY"  # the merged folder of a build without rows (datasets cannot reload an empty save)
# Test hook: raise after this many shards are written (exercises resume without a subprocess).
FAIL_AFTER_SHARDS_ENV = "CSP_BUILD_FAIL_AFTER_SHARDS"


class ConfigMismatchError(RuntimeError):
    """out_dir holds a build made with another config (or another source)."""


class DamagedDataError(RuntimeError):
    """A shard or the merged dataset differs from the digests recorded when it was written."""


class InjectedFailure(RuntimeError):
    """Raised by the test hook FAIL_AFTER_SHARDS_ENV."""


@dataclass
class Chunk:
    """One shard's worth of source samples: their ids (checked on resume) and how to make
    their rows, counting what happened into the Counter it is given (``source_samples``
    among it)."""
    ids: list[str]
    rows: Callable[[Counter], list[dict]]


@dataclass
class Build:
    """What one build writes and how: ``chunks()`` yields the chunks in order (called again
    to rebuild damaged shards; ``one_shot`` when the source cannot be read twice);
    ``finalise(merged)`` turns the concatenated shards (None when no shard has rows) into the
    dataset to save; ``report(dataset, shard_stats)`` is ``build_report.json``."""
    out_dir: Path
    label: str                      # "perturbed dataset", "grounded dataset": printed lines
    config_hash: str
    config: dict                    # recorded in state.json and named when a resume is refused
    grounder: str
    chunks: Callable[[], Iterator[Chunk]]
    features: object
    finalise: Callable[[object], object]
    report: Callable[[object, list[dict]], dict]
    empty_features: Callable[[], object]
    total: int | None = None        # source samples, for the progress bar
    one_shot: bool = False
    progress: bool = True


def build_sharded(b: Build, *, _rebuilt: bool = False):
    """Build (or resume, or just load) ``b.out_dir``; returns the merged Dataset."""
    from datasets import concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    out_dir = Path(b.out_dir)
    shard_dir, final_dir = out_dir / "shards", out_dir / "dataset"
    state = check_state(out_dir, b.config_hash, b.config, b.grounder)
    if state.get("complete") and final_dir.exists():
        shutil.rmtree(shard_dir, ignore_errors=True)  # a build killed just after completing
        problem = dataset_problem(final_dir)
        if problem is None:
            return load_merged(out_dir, b.empty_features)
        # the shards are gone once the merged copy is complete: a damaged copy means a full rebuild
        print(f"[{b.label}] {final_dir} is damaged ({problem}): rebuilding it from the source", flush=True)
        shutil.rmtree(final_dir)
        (out_dir / "state.json").unlink()

    shard_dir.mkdir(parents=True, exist_ok=True)
    done = _finished_shards(shard_dir, b.label)
    damaged = _damaged_shards(done)
    if damaged:
        _report_damage(damaged, done, b.label)
        first = done.index(damaged[0][0])
        _drop_shards_from(done, first)
        done = done[:first]
    shard_stats = [json.loads((p / "shard_stats.json").read_text()) for p in done]
    state = {"config_hash": b.config_hash, "config": b.config, "grounder": b.grounder, "complete": False,
             "shards": len(done), "source_samples_done": sum(s["counts"]["source_samples"] for s in shard_stats)}
    write_json_atomic(out_dir / "state.json", state)
    fail_after = int(os.environ.get(FAIL_AFTER_SHARDS_ENV, "0") or 0)

    start = time.perf_counter()
    bar = tqdm(total=b.total, initial=min(state["source_samples_done"], b.total or state["source_samples_done"]),
               desc=b.label, unit="sample", disable=not b.progress)
    chunks = b.chunks()
    for k, st in enumerate(shard_stats):  # the source still yields the finished shards' samples
        chunk = next(chunks, None)
        if chunk is None or ids_digest(chunk.ids) != st["ids_digest"]:
            raise ConfigMismatchError(f"{out_dir}: the source's samples differ from those of shard {k}; "
                                      "resume needs the same source in the same order")
    written_now = 0
    for index, chunk in enumerate(chunks, start=len(done)):
        stats, t0 = Counter(), time.perf_counter()
        rows = chunk.rows(stats)
        record = {"counts": dict(stats), "ids_digest": ids_digest(chunk.ids), "seconds": time.perf_counter() - t0}
        _write_shard(shard_dir, index, rows, record, b.features)
        shard_stats.append(record)
        written_now += 1
        state.update(shards=index + 1, source_samples_done=state["source_samples_done"] + stats["source_samples"])
        write_json_atomic(out_dir / "state.json", state)
        bar.update(len(chunk.ids))
        if fail_after and written_now >= fail_after:
            raise InjectedFailure(f"{FAIL_AFTER_SHARDS_ENV}={fail_after}: stopping after shard {index}")
    bar.close()

    finished = _finished_shards(shard_dir, b.label)
    damaged = _damaged_shards(finished)  # a shard may have been changed while later ones were built
    if damaged:
        named = ", ".join(f"{p.name} ({why})" for p, why in damaged)
        if _rebuilt:
            raise DamagedDataError(f"{out_dir}: shard(s) {named} are damaged again right after being rebuilt: "
                                   "something keeps changing files in this folder; check the disk")
        if b.one_shot:  # a one-shot iterator cannot yield the damaged shards' samples again
            raise DamagedDataError(f"{out_dir}: shard(s) {named} were damaged during the build and the source is "
                                   "a one-shot iterator; rerun with the same source to rebuild them")
        return build_sharded(b, _rebuilt=True)
    shards = [load_from_disk(str(p / "data")) for p in finished if (p / "data").exists()]
    merged = (concatenate_datasets(shards) if len(shards) > 1 else shards[0]) if shards else None
    final = b.finalise(merged)
    tmp_final = out_dir / "dataset.tmp"
    shutil.rmtree(tmp_final, ignore_errors=True)
    if final is not None:
        with quiet_datasets():
            final.save_to_disk(str(tmp_final))
    else:
        tmp_final.mkdir()
        (tmp_final / EMPTY_FILE).write_text("the build produced no rows; see ../build_report.json\n")
    (tmp_final / DIGESTS_FILE).write_text(json.dumps(file_digests(tmp_final), indent=2, sort_keys=True))
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_final, final_dir)
    result = load_merged(out_dir, b.empty_features)

    report = b.report(result, shard_stats)
    report["sha256"] = dataset_sha256(result)
    report["time_s"]["this_run"] = round(time.perf_counter() - start, 3)  # with merge and sha256
    write_json_atomic(out_dir / "build_report.json", report, sort_keys=False)  # levels in numeric order
    state["complete"] = True
    write_json_atomic(out_dir / "state.json", state)
    # The shards only serve resuming: once the merged copy is complete they would double the disk use.
    shutil.rmtree(shard_dir, ignore_errors=True)
    return result


def chunked(items: Iterable, size: int, ids: Callable[[object], str]) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter); one empty list for no items,
    so that an empty source still leaves one shard recording it."""
    cur, any_ = [], False
    for item in items:
        cur.append(item)
        any_ = True
        if len(cur) >= size:
            yield cur
            cur = []
    if cur or not any_:
        yield cur


# ---------------------------------------------------------------------------------------
# State, shards and digests


def check_state(out_dir: Path, chash: str, config: dict, grounder_name: str) -> dict:
    state_path = out_dir / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("config_hash") != chash:
            raise ConfigMismatchError(
                f"{out_dir} holds a build with another config (hash {state.get('config_hash')} vs {chash}).\n"
                f"  stored: {json.dumps(state.get('config'), sort_keys=True)}\n"
                f"  now:    {json.dumps(config, sort_keys=True)} (grounder {grounder_name!r})\n"
                "Use a fresh out_dir, or delete this one to rebuild."
            )
        return state
    if (out_dir / "shards").exists() and any((out_dir / "shards").iterdir()):
        raise ConfigMismatchError(f"{out_dir} has shards but no state.json: not a folder this builder can resume")
    return {}


def write_json_atomic(path: Path, obj, sort_keys: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys))
    os.replace(tmp, path)


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _finished_shards(shard_dir: Path, label: str) -> list[Path]:
    """Finished shards, in order; stale ``.tmp`` folders of a killed build are removed."""
    if not shard_dir.exists():
        return []
    for p in shard_dir.glob("*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    shards = sorted(p for p in shard_dir.iterdir() if p.is_dir() and p.name.startswith(SHARD_PREFIX))
    for i, p in enumerate(shards):  # shards are written in order: a gap means a shard was deleted
        if p.name != f"{SHARD_PREFIX}{i:05d}":
            print(f"[{label}] {shard_dir}: {SHARD_PREFIX}{i:05d} is missing; rebuilding from it "
                  f"(the {len(shards) - i} shard(s) after it are built again, in source order)", flush=True)
            _drop_shards_from(shards, i)
            return shards[:i]
    return shards


@contextlib.contextmanager
def quiet_datasets():
    """datasets prints a "Saving the dataset" bar per save: one per shard drowns our own bar."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _write_shard(shard_dir: Path, index: int, rows: list[dict], stats: dict, features) -> Path:
    """Write a shard; ``stats`` gains ``files``, the sha256 of every file under ``data/``."""
    from datasets import Dataset

    final = shard_dir / f"{SHARD_PREFIX}{index:05d}"
    tmp = shard_dir / f"{SHARD_PREFIX}{index:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if rows:  # datasets cannot reload a saved empty dataset: an empty shard holds only its stats
        with quiet_datasets():
            Dataset.from_list(rows, features=features).save_to_disk(str(tmp / "data"))
    stats["files"] = file_digests(tmp / "data")
    (tmp / "shard_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    os.replace(tmp, final)  # the shard exists only once it is whole
    return final


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """{path relative to folder: sha256} of every file under ``folder`` ({} when it does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): _sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _digest_problem(folder: Path, recorded: dict[str, str]) -> str | None:
    """The first recorded file under ``folder`` that is missing or changed, or None. Files added
    later are not checked: datasets writes its cache files beside a loaded dataset's own."""
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = _sha256_file(path)
        if actual != digest:
            return f"{name} differs from the file written (sha256 {actual[:12]}..., recorded {digest[:12]}...)"
    return None


def _shard_problem(shard: Path) -> str | None:
    """Why a finished shard cannot be used (unreadable stats, no digests, a changed file), or None."""
    try:
        stats = json.loads((shard / "shard_stats.json").read_text())
        _ = stats["counts"]["source_samples"], stats["ids_digest"]  # the keys resume needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"shard_stats.json is unreadable ({type(e).__name__}: {e})"
    if "files" not in stats:
        return "shard_stats.json records no file digests (written by an older version)"
    problem = _digest_problem(shard / "data", stats["files"])
    return f"data/{problem}" if problem else None


def _damaged_shards(shards: list[Path]) -> list[tuple[Path, str]]:
    return [(p, problem) for p in shards if (problem := _shard_problem(p)) is not None]


def _drop_shards_from(shards: list[Path], first: int) -> None:
    """Remove shards ``first``.. from the last one down, so a kill midway leaves a gapless prefix."""
    for p in reversed(shards[first:]):
        shutil.rmtree(p)


def _report_damage(damaged: list[tuple[Path, str]], done: list[Path], label: str) -> None:
    first = done.index(damaged[0][0])
    names = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    later = len(done) - first - 1
    print(f"[{label}] damaged shard(s), not used ({names}). Rebuilding from {damaged[0][0].name}"
          + (f" (with the {later} shard(s) after it, built in source order)" if later else ""), flush=True)


# ---------------------------------------------------------------------------------------
# The merged dataset


def load_merged(out_dir, empty_features: Callable[[], object]):
    """The merged dataset of a finished build, its files checked against their recorded digests."""
    from datasets import Dataset, load_from_disk

    final = Path(out_dir) / "dataset"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: the build in {out_dir} has not finished")
    verify_dataset_folder(final)
    if (final / EMPTY_FILE).exists():
        features = empty_features()
        return Dataset.from_dict({k: [] for k in features}, features=features)
    return load_from_disk(str(final))


def dataset_problem(final: Path) -> str | None:
    record = final / DIGESTS_FILE
    if not record.exists():
        return None  # a folder from an older version: nothing to check against (warned on load)
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return f"{DIGESTS_FILE} is unreadable ({e})"
    return _digest_problem(final, recorded)


def verify_dataset_folder(final) -> None:
    """Refuse a merged dataset folder whose files differ from the digests written with it."""
    import warnings

    final = Path(final)
    if not (final / DIGESTS_FILE).exists():
        warnings.warn(f"{final} records no file digests ({DIGESTS_FILE}): it cannot be checked for damage; "
                      "rebuild it with build_perturbed_dataset to get them", stacklevel=2)
        return
    problem = dataset_problem(final)
    if problem is not None:
        raise DamagedDataError(f"the perturbed dataset in {final} is damaged: {problem}. Delete {final} and run "
                               "build_perturbed_dataset again on its folder (it rebuilds a damaged copy by itself)")


def dataset_sha256(ds) -> str:
    """sha256 over the rows' content in order: every column, images as decoded pixels (mode, size, bytes),
    so the digest does not depend on how the arrow files or PNGs were laid out."""
    import io

    from datasets import Image as HFImage
    from PIL import Image

    image_cols = [c for c, f in ds.features.items() if isinstance(f, HFImage)]
    raw = ds
    for c in image_cols:
        raw = raw.cast_column(c, HFImage(decode=False))
    cols = sorted(ds.column_names)
    h = hashlib.sha256()
    h.update(json.dumps(cols).encode())
    for batch in raw.iter(batch_size=256):  # batches: per-row formatting would dominate the cost
        for i in range(len(batch[cols[0]]) if cols else 0):
            for col in cols:
                v = batch[col][i]
                h.update(col.encode() + b"\x00")
                if col in image_cols:
                    img = Image.open(io.BytesIO(v["bytes"])) if v.get("bytes") else Image.open(v["path"])
                    h.update(f"{img.mode}{img.size}".encode())
                    h.update(img.tobytes())
                else:
                    h.update(json.dumps(v, sort_keys=True).encode())
                h.update(b"\x01")
    return h.hexdigest()
