"""The procedural object world: the embedded stand-in for COCO, with exact ground truth.

A scene is a few coloured shapes on a dark, smooth background. Everything a later stage
needs is known exactly: category, colour, size, box and pixel mask of every object, the
spatial relations between them, and the scene's split.

Design choices, briefly:

* **Statistics.** Categories are listed in frequency-rank order and drawn from a Zipf-like
  law (``WorldConfig.zipf_exponent``), so POPE's *popular* negatives mean something. Each
  scene has a theme (``THEMES``); most objects come from that theme, so categories
  co-occur in structure and POPE's *adversarial* negatives mean something. Objects may
  repeat a category already in the scene (a count attribute: "two stars").
* **Placement.** A position that would hide more than ``1 - min_visible`` of an earlier
  object is rejected; ``rendering`` paints the objects and gives their visible masks.
* **Splits.** ``base`` (train the base VLM), ``csp`` (build CSP training data) and ``eval``
  draw from independent random streams: the generator of scene (seed, split, index) is
  seeded by ``SeedSequence([seed, split_key, index])``. ``scene_id`` = ``"eval-000042"``.

The rest of the world lives beside this module: what it is made of (``catalog``), how a scene
is drawn (``rendering``), natural-uncertainty variants (``degradations``), scenes on disk
(``scene_io``), captions and questions (``language``), and per-patch pre-training labels
(``patch_labels``).

numpy and PIL only (no torch): rendering a thousand scenes takes about a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from csp_utils.world.catalog import CATEGORIES, COLOR_NAMES, RELATIONS, SPLITS, THEMES
from csp_utils.world.rendering import _box, _render, _template, _visible

_SPLIT_KEYS = {"base": 101, "csp": 202, "eval": 303}
_ID_RE = re.compile(r"^(base|csp|eval)-(\d+)(?:~([a-z_]+)-([0-9.]+))?$")


@dataclass
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0
    background: str = "mixed"          # "plain" | "gradient" | "texture" | "mixed" (one per scene)
    antialias: bool = True             # 4x supersampled edges; masks stay exact (alpha >= 0.5)
    zipf_exponent: float = 0.7         # frequency skew; 0 = uniform (rank 1 is 14**0.7 ~ 6x rank 14)
    theme_strength: float = 0.8        # chance an object comes from the scene's theme
    repeat_prob: float = 0.15          # chance an object repeats a category already placed
    small_prob: float = 0.4            # chance an object is "small"
    large_scale: tuple[float, float] = (0.30, 0.40)   # side as a fraction of image_size
    small_scale: tuple[float, float] = (0.15, 0.20)
    min_visible: float = 0.6           # earlier objects keep at least this share of their pixels
    relation_margin: int = 2           # pixels of clear gap for left/right/above/below/apart
    placement_tries: int = 30          # an object that finds no place is dropped

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"WorldConfig.image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"WorldConfig needs 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if self.background not in ("plain", "gradient", "texture", "mixed"):
            raise ValueError(
                f"WorldConfig.background must be plain, gradient, texture or mixed, got {self.background!r}"
            )


# ------------------------------------------------------------------------- data types
@dataclass(eq=False)
class WorldObject:
    category: str
    color: str
    size: str
    box: tuple[int, int, int, int]     # x0, y0, x1, y1 of the visible mask; x1/y1 exclusive
    mask: np.ndarray                   # (H, W) bool: the object's visible pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.category}"


@dataclass(eq=False)
class Scene:
    scene_id: str
    split: str
    index: int
    image: np.ndarray                  # (H, W, 3) uint8
    objects: list[WorldObject]         # in paint order (later objects are on top)
    variant: str = "clean"
    severity: float = 0.0
    # How the scene was drawn (background spec, per-object centre and side, relation margin):
    # lets degrade() re-render it; JSON-serialisable; saved with the scene.
    meta: dict = field(default_factory=dict)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")

    def categories(self) -> set[str]:
        return {o.category for o in self.objects}

    def count(self, category: str) -> int:
        return sum(o.category == category for o in self.objects)

    def relations(self) -> list[tuple[int, str, int]]:
        """Every (i, relation, j) that clearly holds, for ordered pairs i != j."""
        out = []
        for i in range(len(self.objects)):
            for j in range(len(self.objects)):
                if i != j:
                    out += [(i, r, j) for r in RELATIONS if relation_truth(self, i, r, j) is True]
        return out


# ------------------------------------------------------------------------- statistics
def world_statistics(scenes: Sequence[Scene]) -> dict:
    """Empirical statistics of a set of scenes (what POPE's popular/adversarial use).

    ``image_frequency[c]``: number of scenes containing c; ``object_frequency[c]``: number
    of objects of c; ``cooccurrence[a][b]``: number of scenes containing both a and b (a != b).
    """
    img = {c: 0 for c in CATEGORIES}
    obj = {c: 0 for c in CATEGORIES}
    co = {a: {b: 0 for b in CATEGORIES if b != a} for a in CATEGORIES}
    for s in scenes:
        cats = s.categories()
        for o in s.objects:
            obj[o.category] += 1
        for a in cats:
            img[a] += 1
            for b in cats:
                if a != b:
                    co[a][b] += 1
    return {"n_scenes": len(scenes), "image_frequency": img, "object_frequency": obj, "cooccurrence": co}


def _zipf(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _background_spec(rng: np.random.Generator, config: WorldConfig) -> dict:
    kind = config.background
    if kind == "mixed":
        kind = ("plain", "gradient", "texture")[int(rng.integers(3))]
    base = rng.uniform(28, 75)
    c0 = np.clip(base + rng.uniform(-12, 12, 3), 0, 255)
    c1 = np.clip(c0 + rng.uniform(-25, 25), 0, 255)
    return {
        "kind": kind,
        "c0": [round(float(x), 3) for x in c0],
        "c1": [round(float(x), 3) for x in c1],
        "angle": round(float(rng.uniform(0, 2 * np.pi)), 6),
        "texture_seed": int(rng.integers(2 ** 31)),
        "amp": round(float(rng.uniform(5, 12)), 3),
    }


def _objects(layout: list[dict], masks: list[np.ndarray]) -> list[WorldObject]:
    return [WorldObject(o["category"], o["color"], o["size"], _box(m), m) for o, m in zip(layout, masks)]


# ------------------------------------------------------------------------- scenes
def scene_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def parse_scene_id(sid: str) -> tuple[str, int, str, float]:
    """``"eval-000042~blur-0.50"`` -> ``("eval", 42, "blur", 0.5)``; clean ids give ``"clean", 0.0``."""
    m = _ID_RE.match(sid)
    if not m:
        raise ValueError(f"not a world scene id: {sid!r} (expected e.g. 'eval-000042' or 'eval-000042~blur-0.50')")
    split, idx, var, sev = m.groups()
    return split, int(idx), var or "clean", float(sev) if sev else 0.0


def _rng(config: WorldConfig, split: str, index: int, *extra: int) -> np.random.Generator:
    if split not in _SPLIT_KEYS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence([config.seed, _SPLIT_KEYS[split], index, *extra]))


def _draw_category(rng, theme_p, global_p, placed, config) -> str:
    if placed and rng.random() < config.repeat_prob:
        return placed[int(rng.integers(len(placed)))]
    p = theme_p if rng.random() < config.theme_strength else global_p
    return CATEGORIES[int(rng.choice(len(CATEGORIES), p=p))]


def make_scene(split: str, index: int, config: WorldConfig = WorldConfig()) -> Scene:
    """Scene ``index`` of ``split``: deterministic in (config.seed, split, index)."""
    rng = _rng(config, split, index)
    size = config.image_size
    spec = _background_spec(rng, config)
    global_p = _zipf(len(CATEGORIES), config.zipf_exponent)
    theme = THEMES[list(THEMES)[int(rng.integers(len(THEMES)))]]
    theme_p = np.array([global_p[i] if c in theme else 0.0 for i, c in enumerate(CATEGORIES)])
    theme_p /= theme_p.sum()
    n = int(rng.integers(config.min_objects, config.max_objects + 1))

    layout, full = [], []  # full (unoccluded) masks of the objects placed so far
    for _ in range(n):
        category = _draw_category(rng, theme_p, global_p, [o["category"] for o in layout], config)
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        size_name = "small" if rng.random() < config.small_prob else "large"
        lo, hi = config.small_scale if size_name == "small" else config.large_scale
        side = max(4, int(round(rng.uniform(lo, hi) * size)))
        alpha_mask = _template(category, side, config.antialias) >= 0.5
        for _ in range(config.placement_tries):
            x0 = int(rng.integers(1, size - side))
            y0 = int(rng.integers(1, size - side))
            m = np.zeros((size, size), bool)
            m[y0:y0 + side, x0:x0 + side] = alpha_mask
            vis = _visible(full + [m])
            if all(v.sum() >= config.min_visible * f.sum() for v, f in zip(vis[:-1], full)):
                layout.append({"category": category, "color": color, "size": size_name,
                               "cx": x0 + side / 2, "cy": y0 + side / 2, "side": side})
                full.append(m)
                break
    if not layout:  # cannot happen with sane configs: the first object always finds a place
        raise RuntimeError(f"could not place any object in scene {scene_id(split, index)}; relax WorldConfig")

    image, masks = _render(spec, layout, size, config.antialias)
    meta = {"background": spec, "layout": layout, "relation_margin": config.relation_margin,
            "image_size": size, "antialias": config.antialias}
    return Scene(scene_id(split, index), split, index, image, _objects(layout, masks), meta=meta)


def make_scenes(split: str, n: int, config: WorldConfig = WorldConfig(), start: int = 0) -> list[Scene]:
    return [make_scene(split, i, config) for i in range(start, start + n)]


# ------------------------------------------------------------------------- relations
def relation_truth(scene: Scene, i: int, relation: str, j: int, margin: int | None = None) -> bool | None:
    """Whether "object i <relation> object j" holds: True, False, or None when ambiguous.

    left/right/above/below compare visible boxes: True with a gap of at least ``margin``
    pixels, False when the opposite holds with that gap, None otherwise (overlapping
    ranges, or a gap thinner than the margin). touching: True when the masks touch or
    overlap (8-neighbourhood), False when the boxes are ``margin`` apart, None otherwise.
    """
    if margin is None:
        margin = scene.meta.get("relation_margin", 2)
    a, b = scene.objects[i], scene.objects[j]
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    if relation == "touching":
        if _touch(a.mask, b.mask):
            return True
        apart = bx0 - ax1 >= margin or ax0 - bx1 >= margin or by0 - ay1 >= margin or ay0 - by1 >= margin
        return False if apart else None
    gaps = {"left of": (bx0 - ax1, ax0 - bx1), "right of": (ax0 - bx1, bx0 - ax1),
            "above": (by0 - ay1, ay0 - by1), "below": (ay0 - by1, by0 - ay1)}
    if relation not in gaps:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    yes_gap, no_gap = gaps[relation]
    if yes_gap >= margin:
        return True
    if no_gap >= margin:
        return False
    return None


def _touch(a: np.ndarray, b: np.ndarray) -> bool:
    d = a.copy()  # 8-neighbour dilation by shifting
    d[1:] |= a[:-1]
    d[:-1] |= a[1:]
    e = d.copy()
    e[:, 1:] |= d[:, :-1]
    e[:, :-1] |= d[:, 1:]
    return bool((e & b).any())
