"""The question record every set and source shares: world questions, POPE, AMBER, training
sources; the evaluation sets' names and pools; and what an id encodes (its clean scene, a
grounded question's noise target and level). Plain Python: analysis reads results with it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from csp_utils.world.catalog import DEGRADATIONS

CLEAN_SETS = ("pope-random", "pope-popular", "pope-adversarial", "amber-existence", "amber-attribute", "amber-relation")
POOLS = {"pooled-clean": CLEAN_SETS, "pooled-transfer": tuple(f"transfer-{k}" for k in DEGRADATIONS)}
# sets that only serve the baselines (never reported)
FIT_SETS = ("calibration", "train-sample")
GROUNDED_SET = "grounded-perturbed"   # tells "confidence follows the noise" from "follows correctness"


@dataclass
class QAItem:
    question_id: str
    image_id: str          # scene_id for the world, file name for COCO/AMBER
    question: str
    label: str             # "yes" | "no"
    set: str               # e.g. "pope-random", "amber-attribute", "world-train"
    kind: str              # "existence" | "attribute" | "relation"
    objects: list[str]     # key object phrases of the question
    subtype: str = ""      # finer type: AMBER "state"/"number"/"action"; world "color"/"size"/"count"/relation


NOISE_ON = ("none", "key", "distractor", "global")  # where a grounded row's noise lies


def noise_on_of(question_id: str) -> str | None:
    """The noise target encoded in a grounded evaluation question id (``...@key@c40``)."""
    parts = question_id.split("@")
    return parts[-2] if len(parts) >= 3 and parts[-2] in NOISE_ON else None


def level_of(question_id: str) -> int | None:
    """The noise level of a perturbed question id (``...@c40`` -> 40), else None."""
    m = re.search(r"@c(\d+)$", question_id)
    return int(m.group(1)) if m else None


_SCENE_RE = re.compile(r"^(base|csp|eval)-\d{6}")


def scene_of(image_id: str) -> str:
    """The clean world scene behind an image or question id (``eval-000042~blur-0.70`` and
    ``eval-000042-pope-random-0@c40`` -> ``eval-000042``); other ids (official files) are their own."""
    m = _SCENE_RE.match(str(image_id))
    return m.group(0) if m else str(image_id)
