"""The question record every set and source shares: world questions, POPE, AMBER, training sources."""

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
