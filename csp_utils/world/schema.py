"""The question record every set and source shares: world questions, POPE, AMBER, training
sources; and what a grounded question's id encodes."""

from __future__ import annotations

from dataclasses import dataclass


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
