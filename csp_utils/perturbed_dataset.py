"""The perturbed dataset: (image, question, answer) triples -> CSP training rows, resumably.

For every source sample we find its key objects, ground them once (one pass serves every
confidence level), noise the mask at each level with one shared eps (``perturbation``) and
emit one row per level whose target is the verbalized confidence ``"c%"``.

On disk (``out_dir``)::

    shards/shard-00000/    while building, one per ``shard_size`` *source* samples: ``data/``
                           (``Dataset.save_to_disk``; absent when the shard has no rows) and
                           ``shard_stats.json`` (counts, digest of the sample ids, seconds, and
                           the sha256 of every file under ``data/``); removed once the merged
                           dataset is complete
    state.json             config hash and progress (rewritten atomically after each shard)
    dataset/               the merged dataset (concatenate_datasets of the shards, in order), with
                           ``csp_sha256.json``: the sha256 of each of its files
    build_report.json      counts per level, kept / skipped, grounding failures, time, config, sha256

A shard becomes visible only by an atomic rename of a finished folder, so a killed build
leaves either a whole shard or none. Rerun with the same arguments, the build skips the
source samples of the finished shards and goes on; since each sample's noise depends only on
(seed, sample id), the merged dataset is the same as an uninterrupted build's
(``dataset_sha256``). A folder built with another config is refused.

Damaged files are never used. Every finished shard's files are checked against the digests
recorded when it was written, on resuming and again before merging; a shard that fails (a
changed byte, a truncated or missing file, unreadable stats) is rebuilt from the source, with
a printed line naming it, together with the shards after it (shards are built in source order).
A shard that is still damaged after one rebuild is refused with ``DamagedDataError`` naming it.
The merged dataset is checked the same way whenever it is loaded (``load_perturbed_dataset``):
a damaged copy is refused, naming the file; ``build_perturbed_dataset`` on that folder rebuilds it.

Rows (DESIGN.md, refined): ``sample_id`` ("<source_id>@<ccc>", unique per row), ``source_id``
(the source sample), ``image_id``, ``image`` (HF Image), ``question``, ``answer``,
``key_objects``, ``confidence`` (int percent), ``target_text`` ("c%"), ``confidence_prompt``,
``framing``, ``t``, ``noise_gamma``, ``t_max``, ``schedule``, ``noise`` ("local" | "global" |
"none" for a sample kept clean), ``mask_area`` (fraction of the image in the noised region,
the same at every level of a sample; 0 when kept clean), ``grounder``, ``grounding_status``.

Negatives ("No" answers: their key objects are absent, nothing to perturb) are dropped by
default and counted. A grounding failure (statuses "no_detection", "empty_mask",
"no_objects") follows ``failure_policy``: "skip" drops the sample, "global" noises the whole
image at every level, "clean" keeps one unperturbed row at 100% (the only confidence an
unperturbed image supports). Each case is counted in the report, never silent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from . import perturbation
from .images import to_rgb
from .perturbation import NoiseConfig, validate_levels
from .prompts import FRAMINGS, confidence_text, format_confidence

FAILURE_POLICIES = ("skip", "global", "clean")
TARGETS = ("paper", "grounded")
FORMAT_VERSION = 1  # bump when the row layout or the noise changes: old folders then refuse to resume
_SHARD_PREFIX = "shard-"
DIGESTS_FILE = "csp_sha256.json"  # in the merged dataset folder: sha256 of each of its files
# Test hook: raise after this many shards are written (exercises resume without a subprocess).
FAIL_AFTER_SHARDS_ENV = "CSP_BUILD_FAIL_AFTER_SHARDS"


class ConfigMismatchError(RuntimeError):
    """out_dir holds a build made with another config (or another source)."""


class DamagedDataError(RuntimeError):
    """A shard or the merged dataset differs from the digests recorded when it was written."""


class InjectedFailure(RuntimeError):
    """Raised by the test hook FAIL_AFTER_SHARDS_ENV."""


# ---------------------------------------------------------------------------------------
# Config


@dataclass
class BuildConfig:
    levels: tuple[int, ...] | None = None   # integer percents; None = noise.levels (0, 10, ..., 100)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    framing: str = "third"                  # confidence prompt: "third" (paper) | "first"
    failure_policy: str = "skip"            # grounding failed: "skip" | "global" (whole image) | "clean" (kept at 100%)
    include_negatives: bool = False         # "No" answers: their key objects are absent, nothing to perturb
    shard_size: int = 100                   # source samples per shard (x levels rows)
    seed: int | None = None                 # noise seed; None = noise.seed
    grounder: str = "annotations"           # grounder spec for make_grounder when none is passed
    png_compress_level: int = 1             # noised pixels barely compress: at 512 px level 1 is 3x faster than PIL's 6 for 9% more bytes
    targets: str = "paper"                  # "paper": target = noise level | "grounded": the base model's own answers (grounded.py)
    grounded: Any = None                    # grounded.GroundedOptions (or its dict) when targets == "grounded"

    def __post_init__(self):
        if isinstance(self.noise, dict):  # read back from JSON / YAML
            self.noise = NoiseConfig(**self.noise)
        if self.levels is not None:
            self.levels = validate_levels(self.levels)
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {FAILURE_POLICIES}, got {self.failure_policy!r}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        if self.targets == "paper" and self.grounded is not None:
            raise ValueError("grounded options were given with targets='paper'; set targets='grounded' or drop them")
        if self.targets == "grounded":
            from .grounded import GroundedOptions

            if self.grounded is None or isinstance(self.grounded, dict):
                self.grounded = GroundedOptions(**(self.grounded or {}))

    def effective_noise(self) -> NoiseConfig:
        """The NoiseConfig the build uses: BuildConfig's levels / seed, where given, win."""
        noise = self.noise
        if self.levels is not None:
            noise = replace(noise, levels=self.levels)
        if self.seed is not None:
            noise = replace(noise, seed=self.seed)
        return noise

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise"] = asdict(self.effective_noise())
        d["levels"], d["seed"] = list(d["noise"]["levels"]), d["noise"]["seed"]
        d["noise"]["levels"] = list(d["noise"]["levels"])
        if self.targets == "paper":  # the paper build's config (and so its hash) stays what it was
            del d["targets"], d["grounded"]
        return d


def _grounder_fingerprint(grounder) -> str:
    """The grounder's name plus the settings that change its masks (thresholds), for the config hash."""
    name = str(getattr(grounder, "name", type(grounder).__name__))
    knobs = [f"{k}={getattr(grounder, k)}" for k in ("box_threshold", "text_threshold", "max_boxes")
             if hasattr(grounder, k)]
    return f"{name}({', '.join(knobs)})" if knobs else name


def config_hash(config: BuildConfig, grounder_name: str) -> str:
    payload = {"format": FORMAT_VERSION, "config": config.to_dict(), "grounder_name": grounder_name}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Sources: iterables of SourceItem (tuples (sample_id, image, question, answer[, image_id]) work too)


@dataclass
class SourceItem:
    sample_id: str
    image: Any                              # PIL image, uint8 (H, W[, 3 | 4]) array, or a zero-argument loader
    question: str
    answer: str
    image_id: str | None = None             # lets the annotation grounder find its masks
    objects: list[str] | None = None        # key objects, when the source knows them (world questions)

    def load_image(self) -> Image.Image:
        """The image as RGB; transparency (PIL or array) is composited onto white (``csp_utils.images``)."""
        img = self.image() if callable(self.image) else self.image
        if not isinstance(img, (Image.Image, np.ndarray)):
            raise TypeError(f"sample {self.sample_id!r}: image must be a PIL image or uint8 array, got {type(img)}")
        try:
            return to_rgb(img)
        except ValueError as e:
            raise ValueError(f"sample {self.sample_id!r}: {e}") from None


def as_source_item(item) -> SourceItem:
    if isinstance(item, SourceItem):
        return item
    if isinstance(item, (tuple, list)) and len(item) in (4, 5):
        return SourceItem(*item)
    raise TypeError(
        "a source must yield SourceItem or tuples (sample_id, image, question, answer[, image_id]); "
        f"got {type(item).__name__} {str(item)[:80]}"
    )


class Source:
    """A re-iterable source with a length (for the progress bar); sources are built lazily."""

    def __init__(self, make_iter: Callable[[], Iterator[SourceItem]], length: int | None, name: str, scenes=None):
        self._make_iter, self._length, self.name = make_iter, length, name
        self.scenes = scenes  # world sources: what the default annotation grounder is built from

    def __iter__(self) -> Iterator[SourceItem]:
        return self._make_iter()

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError(f"source {self.name} has no known length")
        return self._length


def world_source(scenes, questions_per_scene: int = 4, seed: int = 0) -> Source:
    """Object-world scenes with their generated yes/no questions; answers are "Yes" / "No".

    Questions come from ``scenes.world_questions`` with a generator seeded per scene
    (seed, scene_id), so a scene's questions do not depend on the other scenes in the list.
    """
    from . import scenes as scenes_mod

    scenes = list(scenes)

    def items():
        for scene in scenes:
            rng = np.random.default_rng(perturbation.sample_seed(seed, scene.scene_id))
            for qa in scenes_mod.world_questions(scene, rng, questions_per_scene):
                answer = "Yes" if str(qa.label).lower() == "yes" else "No"
                yield SourceItem(
                    sample_id=qa.question_id, image=scene.to_pil, question=qa.question, answer=answer,
                    image_id=scene.scene_id, objects=list(qa.objects),
                )

    source = Source(items, None, f"world({len(scenes)} scenes x {questions_per_scene})", scenes=scenes)
    source.questions_per_scene, source.question_seed = questions_per_scene, seed  # grounded builds redraw them
    return source


SOURCE_ERRORS = ("raise", "report")


def _bad_row(on_error: str, malformed: list, where: str, reason: str, message: str, error=ValueError):
    """A malformed row: raise (``on_error="raise"``) or record it for the source's report."""
    if on_error == "raise":
        raise error(f"{where}: {message}")
    malformed.append({"where": where, "reason": reason, "message": message})


def _source_report(n_rows: int, malformed: list) -> dict:
    return {"rows": n_rows, "malformed": len(malformed),
            "malformed_by_reason": dict(Counter(m["reason"] for m in malformed)),
            "malformed_rows": malformed[:50]}  # the first ones, to fix the file with


def _check_on_error(on_error: str) -> None:
    if on_error not in SOURCE_ERRORS:
        raise ValueError(f"on_error must be one of {SOURCE_ERRORS}, got {on_error!r}")


def jsonl_source(path, image_folder, on_error: str = "raise") -> Source:
    """A JSONL file of (image, question, answer) rows, as RLAIF-style data come.

    Schema, one JSON object per line::

        {"image": "<file name under image_folder>", "question": "...", "answer": "...",
         "id": "<unique sample id>"            (optional; else "question_id", else "<file stem>-<line>"),
         "image_id": "..."                     (optional; what the annotation grounder looks up, default: image),
         "objects": ["key object", ...]}       (optional; else extracted from question and answer)

    Every line is checked when the source is made (valid JSON object, the three fields present
    as non-empty strings, ``objects`` a list of strings, the image file exists, ids unique), so
    a bad line fails at once with its line number, not hours into a build. ``on_error="report"``
    leaves malformed lines out instead and counts them in ``source.report`` (line, reason):
    never dropped silently. Blank lines are not rows.
    """
    _check_on_error(on_error)
    path, image_folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL source not found: {path}")
    records, malformed, seen = [], [], set()
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_row(on_error, malformed, where, "invalid_json", f"not valid JSON ({e})")
                continue
            if not isinstance(rec, dict):
                _bad_row(on_error, malformed, where, "not_an_object", f"expected a JSON object, got {type(rec).__name__}")
                continue
            missing = [k for k in ("image", "question", "answer") if k not in rec]
            if missing:
                _bad_row(on_error, malformed, where, "missing_field",
                         f"missing field(s) {missing}; each line needs image, question, answer")
                continue
            empty = [k for k in ("image", "question", "answer") if not isinstance(rec[k], str) or not rec[k].strip()]
            if empty:
                _bad_row(on_error, malformed, where, "empty_field", f"field(s) {empty} must be non-empty strings")
                continue
            objects = rec.get("objects")
            if objects is not None and not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
                _bad_row(on_error, malformed, where, "bad_objects", f"'objects' must be a list of strings, got {objects!r}")
                continue
            img_path = image_folder / rec["image"]
            if not img_path.is_file():
                _bad_row(on_error, malformed, where, "image_not_found",
                         f"image {rec['image']!r} not found in {image_folder}", FileNotFoundError)
                continue
            sid = str(rec.get("id", rec.get("question_id", f"{path.stem}-{lineno:06d}")))
            if sid in seen:  # ids seed the noise: a duplicate is never kept, whatever on_error says
                raise ValueError(f"{where}: duplicate sample id {sid!r}; ids must be unique (they seed the noise)")
            seen.add(sid)
            records.append((sid, img_path, rec))

    def items():
        for sid, img_path, rec in records:
            yield SourceItem(
                sample_id=sid, image=lambda p=img_path: Image.open(p), question=str(rec["question"]),
                answer=str(rec["answer"]), image_id=str(rec.get("image_id", rec["image"])),
                objects=rec.get("objects"),
            )

    source = Source(items, len(records), f"jsonl({path.name})")
    source.report = _source_report(len(records), malformed)
    return source


def hf_source(dataset, image_col: str = "image", question_col: str = "question", answer_col: str | None = None,
              id_col: str | None = None, prefix: str = "hf", on_error: str = "raise") -> Source:
    """A Hugging Face dataset of (image, question, answer) rows.

    Columns: ``image_col`` (an ``Image`` feature, a path, or a PIL image), ``question_col``,
    ``answer_col`` (None takes "answer", else "chosen": for RLAIF-V-style preference data the
    chosen response serves as the answer), ``id_col`` (None takes "id", "idx" or
    "question_id" when present, else ``{prefix}-{row index}``). Rows whose question or answer
    is missing / empty or whose image is missing are malformed: ``on_error="raise"`` stops at
    the first, ``"report"`` leaves them out and counts them in ``source.report``. The text
    columns and image presence are checked up front (images are not decoded for it).
    """
    _check_on_error(on_error)
    cols = list(dataset.column_names)
    if answer_col is None:
        answer_col = next((c for c in ("answer", "chosen") if c in cols), None)
        if answer_col is None:
            raise ValueError(f"no answer column: pass answer_col (columns are {cols})")
    if id_col is None:
        id_col = next((c for c in ("id", "idx", "question_id") if c in cols), None)
    for name, col in (("image_col", image_col), ("question_col", question_col), ("answer_col", answer_col),
                      ("id_col", id_col)):
        if col is not None and col not in cols:
            raise ValueError(f"{name}={col!r} is not a column of the dataset (columns are {cols})")

    def load(value):
        if isinstance(value, dict):  # undecoded Image feature
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        if isinstance(value, (str, os.PathLike)):
            return Image.open(value)
        return value

    # checked once up front, without decoding images
    from datasets import Image as HFImage

    raw = dataset
    if isinstance(dataset.features.get(image_col), HFImage):
        raw = dataset.cast_column(image_col, HFImage(decode=False))
    images, questions, answers = raw[image_col], raw[question_col], raw[answer_col]
    ids = raw[id_col] if id_col else [f"{prefix}-{i:07d}" for i in range(len(raw))]
    keep, malformed, seen = [], [], set()
    for i, (img, q, a, sid) in enumerate(zip(images, questions, answers, ids)):
        where = f"row {i}"
        bad = [c for c, v in ((question_col, q), (answer_col, a)) if not isinstance(v, str) or not v.strip()]
        if bad:
            _bad_row(on_error, malformed, where, "empty_field", f"column(s) {bad} must be non-empty strings")
            continue
        if img is None or (isinstance(img, dict) and not img.get("bytes") and not img.get("path")):
            _bad_row(on_error, malformed, where, "missing_image", f"column {image_col!r} holds no image")
            continue
        if str(sid) in seen:
            raise ValueError(f"{where}: duplicate sample id {sid!r}; ids must be unique (they seed the noise)")
        seen.add(str(sid))
        keep.append(i)

    def items():
        for i in keep:
            rec = dataset[i]
            sid = str(rec[id_col]) if id_col else f"{prefix}-{i:07d}"
            yield SourceItem(sample_id=sid, image=load(rec[image_col]), question=str(rec[question_col]),
                             answer=str(rec[answer_col]), image_id=sid)

    source = Source(items, len(keep), f"hf({answer_col})")
    source.report = _source_report(len(keep), malformed)
    return source


# ---------------------------------------------------------------------------------------
# Rows


def _features():
    from datasets import Features, Image as HFImage, Sequence, Value

    return Features({
        "sample_id": Value("string"), "source_id": Value("string"), "image_id": Value("string"),
        "image": HFImage(), "question": Value("string"), "answer": Value("string"),
        "key_objects": Sequence(Value("string")), "confidence": Value("int32"), "target_text": Value("string"),
        "confidence_prompt": Value("string"), "framing": Value("string"), "t": Value("int32"),
        "noise_gamma": Value("float64"), "t_max": Value("int32"), "schedule": Value("string"),
        "noise": Value("string"), "mask_area": Value("float64"), "grounder": Value("string"),
        "grounding_status": Value("string"),
    })


def is_negative(answer: str) -> bool:
    """A "No" answer (its key objects are absent from the image)."""
    return answer.strip().strip(".!").strip().lower() == "no"


def _png(arr: np.ndarray, level: int) -> dict:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=level)
    return {"bytes": buf.getvalue(), "path": None}


def _key_objects(item: SourceItem, vocabulary) -> list[str]:
    if item.objects is not None:
        return [str(o) for o in item.objects]
    from .keyobjects import key_objects

    return list(key_objects(item.question, item.answer, vocabulary=vocabulary))


def _ground(grounder, image: Image.Image, phrases: list[str], image_id) -> tuple[np.ndarray | None, str]:
    """(mask or None, status). An "ok" with a missing or empty mask is counted as "empty_mask"."""
    if not phrases:
        return None, "no_objects"
    result = grounder.ground(image, phrases, image_id=image_id)
    status, mask = result.status, result.mask
    if status == "ok":
        if mask is None or not np.asarray(mask).any():
            return None, "empty_mask"
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"grounder {getattr(grounder, 'name', grounder)!r} returned a mask of shape "
                             f"{mask.shape} for an image of (H, W) = {(image.height, image.width)}")
        return mask, "ok"
    return None, status


def sample_rows(item: SourceItem, grounder, config: BuildConfig, stats: Counter, vocabulary=None) -> list[dict]:
    """The rows of one source sample (none if it is dropped); counts what happened in ``stats``."""
    noise_cfg = config.effective_noise()
    grounder_name = str(getattr(grounder, "name", type(grounder).__name__))
    stats["source_samples"] += 1
    if is_negative(item.answer) and not config.include_negatives:
        stats["negatives_dropped"] += 1
        return []
    image = item.load_image()
    phrases = _key_objects(item, vocabulary)
    mask, status = _ground(grounder, image, phrases, item.image_id)  # one pass serves every level
    stats[f"grounding/{status}"] += 1

    levels, noise_kind = noise_cfg.levels, noise_cfg.noise
    if status != "ok":
        stats[f"failure_policy/{config.failure_policy}"] += 1
        if config.failure_policy == "skip":
            stats["skipped_samples"] += 1
            return []
        if config.failure_policy == "global":
            noise_kind = "global"
        else:  # "clean": an unperturbed image honestly supports only 100%
            levels, noise_kind = (100,), "none"
    stats["kept_samples"] += 1

    arr = np.asarray(image)
    if noise_kind == "none":
        images, area = arr[None], 0.0
    else:
        run_cfg = replace(noise_cfg, noise=noise_kind)
        images = perturbation.perturb_levels_array(arr, mask, levels, run_cfg, key=item.sample_id)
        area = 1.0 if noise_kind == "global" else float(mask.mean())
    stats[f"noise/{noise_kind}"] += 1
    if mask is not None:
        stats["mask_area_sum"] += float(mask.mean())  # grounded area, for the report's mean

    rows = []
    for c, img in zip(levels, images):
        t = perturbation.level_to_step(c, noise_cfg) if noise_kind != "none" else 0
        rows.append({
            "sample_id": f"{item.sample_id}@{c:03d}", "source_id": item.sample_id,
            "image_id": str(item.image_id if item.image_id is not None else item.sample_id),
            "image": _png(img, config.png_compress_level), "question": item.question, "answer": item.answer,
            "key_objects": phrases, "confidence": c, "target_text": format_confidence(c),
            "confidence_prompt": confidence_text(item.question, item.answer, framing=config.framing),
            "framing": config.framing, "t": t, "noise_gamma": float(noise_cfg.noise_gamma),
            "t_max": int(noise_cfg.t_max), "schedule": noise_cfg.schedule, "noise": noise_kind,
            "mask_area": area, "grounder": grounder_name, "grounding_status": status,
        })
        stats[f"level/{c}"] += 1
    stats["rows"] += len(rows)
    return rows


# ---------------------------------------------------------------------------------------
# The build


def _write_json_atomic(path: Path, obj, sort_keys: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys))
    os.replace(tmp, path)


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _finished_shards(shard_dir: Path) -> list[Path]:
    """Finished shards, in order; stale ``.tmp`` folders of a killed build are removed."""
    if not shard_dir.exists():
        return []
    for p in shard_dir.glob("*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    shards = sorted(p for p in shard_dir.iterdir() if p.is_dir() and p.name.startswith(_SHARD_PREFIX))
    for i, p in enumerate(shards):  # shards are written in order: a gap means a shard was deleted
        if p.name != f"{_SHARD_PREFIX}{i:05d}":
            print(f"[perturbed dataset] {shard_dir}: {_SHARD_PREFIX}{i:05d} is missing; rebuilding from it "
                  f"(the {len(shards) - i} shard(s) after it are built again, in source order)", flush=True)
            _drop_shards_from(shards, i)
            return shards[:i]
    return shards


@contextlib.contextmanager
def _quiet_datasets():
    """datasets prints a "Saving the dataset" bar per save: one per shard drowns our own bar."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _write_shard(shard_dir: Path, index: int, rows: list[dict], stats: dict, features=None) -> Path:
    """Write a shard; ``stats`` gains ``files``, the sha256 of every file under ``data/``."""
    from datasets import Dataset

    final = shard_dir / f"{_SHARD_PREFIX}{index:05d}"
    tmp = shard_dir / f"{_SHARD_PREFIX}{index:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if rows:  # datasets cannot reload a saved empty dataset: an empty shard holds only its stats
        with _quiet_datasets():
            Dataset.from_list(rows, features=features or _features()).save_to_disk(str(tmp / "data"))
    stats["files"] = _file_digests(tmp / "data")
    (tmp / "shard_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    os.replace(tmp, final)  # the shard exists only once it is whole
    return final


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_digests(folder: Path) -> dict[str, str]:
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


def _report_damage(damaged: list[tuple[Path, str]], done: list[Path]) -> None:
    first = done.index(damaged[0][0])
    names = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    later = len(done) - first - 1
    print(f"[perturbed dataset] damaged shard(s), not used ({names}). Rebuilding from {damaged[0][0].name}"
          + (f" (with the {later} shard(s) after it, built in source order)" if later else ""), flush=True)


def _check_state(out_dir: Path, chash: str, config: BuildConfig, grounder_name: str) -> dict:
    state_path = out_dir / "state.json"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("config_hash") != chash:
            raise ConfigMismatchError(
                f"{out_dir} holds a build with another config (hash {state.get('config_hash')} vs {chash}).\n"
                f"  stored: {json.dumps(state.get('config'), sort_keys=True)}\n"
                f"  now:    {json.dumps(config.to_dict(), sort_keys=True)} (grounder {grounder_name!r})\n"
                "Use a fresh out_dir, or delete this one to rebuild."
            )
        return state
    if (out_dir / "shards").exists() and any((out_dir / "shards").iterdir()):
        raise ConfigMismatchError(f"{out_dir} has shards but no state.json: not a folder this builder can resume")
    return {}


def build_perturbed_dataset(source: Iterable, grounder=None, out_dir="perturbed", config: BuildConfig | None = None,
                            vocabulary=None, progress: bool = True, model=None, processor=None, *,
                            _rebuilt: bool = False):
    """Build (or resume, or just load) the perturbed dataset in ``out_dir``; returns the merged Dataset.

    ``source`` yields SourceItem or (sample_id, image, question, answer[, image_id]) tuples in a
    fixed order (resume skips the samples of finished shards and checks their ids).
    ``grounder`` has ``.name`` and ``.ground(image, phrases, image_id=None)``; None builds
    ``grounding.make_grounder(config.grounder, scenes=source.scenes)``. ``vocabulary`` goes to
    key-object extraction for items that do not carry their key objects. A ``noise="global"``
    build (the ablation) still grounds every sample, so that the failure policy keeps the same
    samples as the local build it is compared with.

    ``config.targets == "grounded"`` builds grounded rows instead (``grounded.build_grounded_dataset``):
    it needs a ``world_source`` and the base ``model`` / ``processor`` whose answers it records.
    """
    from datasets import concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    config = config or BuildConfig()
    if config.targets == "grounded":
        return _build_grounded(source, grounder, out_dir, config, progress, model, processor)
    if grounder is None:
        from .grounding import make_grounder

        grounder = make_grounder(config.grounder, scenes=getattr(source, "scenes", None))
    grounder_name = _grounder_fingerprint(grounder)
    out_dir = Path(out_dir)
    shard_dir, final_dir = out_dir / "shards", out_dir / "dataset"
    chash = config_hash(config, grounder_name)
    state = _check_state(out_dir, chash, config, grounder_name)
    if state.get("complete") and final_dir.exists():
        shutil.rmtree(shard_dir, ignore_errors=True)  # a build killed just after completing
        problem = _dataset_problem(final_dir)
        if problem is None:
            return load_perturbed_dataset(out_dir)
        # the shards are gone once the merged copy is complete: a damaged copy means a full rebuild
        print(f"[perturbed dataset] {final_dir} is damaged ({problem}): rebuilding it from the source", flush=True)
        shutil.rmtree(final_dir)
        state = {}
        (out_dir / "state.json").unlink()

    shard_dir.mkdir(parents=True, exist_ok=True)
    done = _finished_shards(shard_dir)
    damaged = _damaged_shards(done)
    if damaged:
        _report_damage(damaged, done)
        first = done.index(damaged[0][0])
        _drop_shards_from(done, first)
        done = done[:first]
    shard_stats = [json.loads((p / "shard_stats.json").read_text()) for p in done]
    state = {"config_hash": chash, "config": config.to_dict(), "grounder": grounder_name, "complete": False,
             "shards": len(done), "source_samples_done": sum(s["counts"]["source_samples"] for s in shard_stats)}
    _write_json_atomic(out_dir / "state.json", state)
    fail_after = int(os.environ.get(FAIL_AFTER_SHARDS_ENV, "0") or 0)

    start, skip = time.perf_counter(), len(done) * config.shard_size
    try:
        total = len(source)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = tqdm(total=total, initial=min(skip, total or skip), desc="perturbed dataset", unit="sample",
               disable=not progress)
    it = iter(source)

    # Skip what the finished shards hold, checking that the source still yields the same samples.
    seen: set[str] = set()  # sample ids seed the noise and name the rows: they must be unique
    for k, st in enumerate(shard_stats):
        try:
            ids = [as_source_item(next(it)).sample_id for _ in range(st["counts"]["source_samples"])]
        except StopIteration:
            raise ConfigMismatchError(f"{out_dir}: the source ended before the samples of shard {k}; "
                                      "resume needs the same source in the same order") from None
        if _ids_digest(ids) != st["ids_digest"]:
            raise ConfigMismatchError(f"{out_dir}: the source's samples differ from those of shard {k}; "
                                      "resume needs the same source in the same order")
        seen.update(ids)

    index, rows, ids, stats, t0 = len(done), [], [], Counter(), time.perf_counter()
    written_now = 0

    def flush():
        nonlocal index, rows, ids, stats, t0, written_now
        record = {"counts": dict(stats), "ids_digest": _ids_digest(ids), "seconds": time.perf_counter() - t0}
        _write_shard(shard_dir, index, rows, record)
        shard_stats.append(record)
        index, written_now = index + 1, written_now + 1
        state.update(shards=index, source_samples_done=state["source_samples_done"] + stats["source_samples"])
        _write_json_atomic(out_dir / "state.json", state)
        rows, ids, stats, t0 = [], [], Counter(), time.perf_counter()
        if fail_after and written_now >= fail_after:
            raise InjectedFailure(f"{FAIL_AFTER_SHARDS_ENV}={fail_after}: stopping after shard {index - 1}")

    for raw in it:
        item = as_source_item(raw)
        if item.sample_id in seen:
            raise ValueError(f"duplicate sample id {item.sample_id!r} in the source: ids must be unique "
                             "(they seed each sample's noise and name its rows)")
        seen.add(item.sample_id)
        ids.append(item.sample_id)
        rows.extend(sample_rows(item, grounder, config, stats, vocabulary))
        bar.update(1)
        if stats["source_samples"] >= config.shard_size:
            flush()
    if stats["source_samples"] or index == 0:  # the last partial shard (or an empty source's one shard)
        flush()
    bar.close()

    finished = _finished_shards(shard_dir)
    damaged = _damaged_shards(finished)  # a shard may have been changed while later ones were built
    if damaged:
        if _rebuilt:
            raise DamagedDataError(
                f"{out_dir}: shard(s) {', '.join(f'{p.name} ({why})' for p, why in damaged)} are damaged again "
                "right after being rebuilt: something keeps changing files in this folder; check the disk")
        if iter(source) is source:  # a one-shot iterator cannot yield the damaged shards' samples again
            raise DamagedDataError(
                f"{out_dir}: shard(s) {', '.join(f'{p.name} ({why})' for p, why in damaged)} were damaged during "
                "the build and the source is a one-shot iterator; rerun with the same source to rebuild them")
        return build_perturbed_dataset(source, grounder, out_dir, config, vocabulary, progress, _rebuilt=True)
    shards = [load_from_disk(str(p / "data")) for p in finished if (p / "data").exists()]
    tmp_final = out_dir / "dataset.tmp"
    shutil.rmtree(tmp_final, ignore_errors=True)
    if shards:
        with _quiet_datasets():
            (concatenate_datasets(shards) if len(shards) > 1 else shards[0]).save_to_disk(str(tmp_final))
    else:
        tmp_final.mkdir()
        (tmp_final / "EMPTY").write_text("the build produced no rows; see ../build_report.json\n")
    (tmp_final / DIGESTS_FILE).write_text(json.dumps(_file_digests(tmp_final), indent=2, sort_keys=True))
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp_final, final_dir)
    result = load_perturbed_dataset(out_dir)

    report = build_report(shard_stats, config, grounder_name, chash, getattr(source, "name", type(source).__name__))
    report["sha256"] = dataset_sha256(result)
    report["time_s"]["this_run"] = round(time.perf_counter() - start, 3)  # with merge and sha256
    _write_json_atomic(out_dir / "build_report.json", report, sort_keys=False)  # levels in numeric order
    if len(result) == 0:
        warnings.warn(f"the perturbed dataset in {out_dir} has no rows: {report['source_samples']} source samples, "
                      f"{report['negatives_dropped']} negatives dropped, grounding failures "
                      f"{report['grounding_failures']} under policy {config.failure_policy!r}")
    state["complete"] = True
    _write_json_atomic(out_dir / "state.json", state)
    # The shards only serve resuming: once the merged copy is complete they would double the disk use.
    shutil.rmtree(shard_dir, ignore_errors=True)
    return result


def _build_grounded(source, grounder, out_dir, config: BuildConfig, progress: bool, model, processor):
    from .grounded import build_grounded_dataset

    if getattr(source, "scenes", None) is None or not hasattr(source, "questions_per_scene"):
        raise ValueError("targets='grounded' needs a world_source(...) (scenes with exact object masks)")
    if model is None or processor is None:
        raise ValueError("targets='grounded' records the base model's own answers: pass model= and processor=")
    if grounder is not None or config.grounder != "annotations":
        raise ValueError("targets='grounded' grounds with the scenes' own annotations; pass no grounder")
    return build_grounded_dataset(source.scenes, model, processor, out_dir, config,
                                  questions_per_scene=source.questions_per_scene,
                                  question_seed=source.question_seed, progress=progress)


def build_report(shard_stats: list[dict], config: BuildConfig, grounder_name: str, chash: str, source_name: str) -> dict:
    total = Counter()
    for st in shard_stats:
        total.update(st["counts"])

    def group(prefix):
        return {k[len(prefix):]: v for k, v in sorted(total.items()) if k.startswith(prefix)}

    levels = config.effective_noise().levels
    per_level = {str(c): total.get(f"level/{c}", 0) for c in sorted(set(levels) | {int(k) for k in group("level/")})}
    grounding = group("grounding/")
    return {
        "source": source_name,
        "grounder": grounder_name,
        "config_hash": chash,
        "config": config.to_dict(),
        "source_samples": total["source_samples"],
        "negatives_dropped": total["negatives_dropped"],
        "grounded_samples": sum(grounding.values()),
        "grounding_status": grounding,
        "grounding_failures": {k: v for k, v in grounding.items() if k != "ok"},
        "failure_policy": config.failure_policy,
        "failures_by_policy": group("failure_policy/"),
        "kept_samples": total["kept_samples"],
        "mean_mask_area": round(total["mask_area_sum"] / grounding["ok"], 5) if grounding.get("ok") else None,
        "skipped_samples": total["skipped_samples"],
        "noise_kinds": group("noise/"),
        "rows": total["rows"],
        "rows_per_level": per_level,
        "shards": len(shard_stats),
        "time_s": {"shards_total": round(sum(st["seconds"] for st in shard_stats), 3)},
    }


def load_perturbed_dataset(out_dir):
    """The merged dataset of a finished build, its files checked against their recorded digests."""
    from datasets import load_from_disk

    from datasets import Dataset

    final = Path(out_dir) / "dataset"
    if not final.exists():
        raise FileNotFoundError(f"{final} not found: the build in {out_dir} has not finished")
    verify_dataset_folder(final)
    if (final / "EMPTY").exists():
        return Dataset.from_dict({k: [] for k in _features()}, features=_features())
    return load_from_disk(str(final))


def _dataset_problem(final: Path) -> str | None:
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
    final = Path(final)
    if not (final / DIGESTS_FILE).exists():
        warnings.warn(f"{final} records no file digests ({DIGESTS_FILE}): it cannot be checked for damage; "
                      "rebuild it with build_perturbed_dataset to get them", stacklevel=2)
        return
    problem = _dataset_problem(final)
    if problem is not None:
        raise DamagedDataError(f"the perturbed dataset in {final} is damaged: {problem}. Delete {final} and run "
                               "build_perturbed_dataset again on its folder (it rebuilds a damaged copy by itself)")


def dataset_sha256(ds) -> str:
    """sha256 over the rows' content in order: every column, images as decoded pixels (mode, size, bytes),
    so the digest does not depend on how the arrow files or PNGs were laid out."""
    from datasets import Image as HFImage

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
