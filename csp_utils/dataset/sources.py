"""Training sources: iterables of :class:`SourceItem` (image, question, answer and what the
grounder needs) from the object world, a JSONL file or a Hugging Face dataset; every row is
checked when the source is made, and malformed rows raise or are counted, never dropped
silently."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from csp_utils.core.images import to_rgb
from csp_utils.dataset import csp_noise
from csp_utils.world import language


@dataclass
class SourceItem:
    sample_id: str
    image: Any                              # PIL image, uint8 (H, W[, 3 | 4]) array, or a zero-argument loader
    question: str
    answer: str
    image_id: str | None = None             # lets the annotation grounder find its masks
    objects: list[str] | None = None        # key objects, when the source knows them (world questions)

    def load_image(self) -> Image.Image:
        """The image as RGB; transparency (PIL or array) is composited onto white (``csp_utils.core.images``)."""
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

    Questions come from ``language.world_questions`` with a generator seeded per scene
    (seed, scene_id), so a scene's questions do not depend on the other scenes in the list.
    """
    scenes = list(scenes)

    def items():
        for scene in scenes:
            rng = np.random.default_rng(csp_noise.sample_seed(seed, scene.scene_id))
            for qa in language.world_questions(scene, rng, questions_per_scene):
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
