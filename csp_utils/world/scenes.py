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
* **Rendering.** Each object is an alpha template (supersampled for anti-aliasing, cached
  per (category, side)) blended onto the background in paint order. An object's mask is
  ``alpha >= 0.5`` minus the masks of objects painted later: exactly its visible pixels.
  Placement rejects positions that would hide more than ``1 - min_visible`` of an earlier
  object. ``WorldObject.box`` is the tight box of the visible mask.
* **Splits.** ``base`` (train the base VLM), ``csp`` (build CSP training data) and ``eval``
  draw from independent random streams: the generator of scene (seed, split, index) is
  seeded by ``SeedSequence([seed, split_key, index])``. ``scene_id`` = ``"eval-000042"``.
* **Natural uncertainty.** :func:`degrade` makes blur, low-light, small-object, occlusion
  and clutter variants with a severity in [0, 1]; 0 leaves the image unchanged, and the
  random draws do not depend on severity, so images change monotonically with it. None of
  them uses Gaussian pixel noise (that is CSP's perturbation, in ``csp_utils.dataset.csp_noise``).
  A variant's ``scene_id`` gets a suffix (``"eval-000042~blur-0.50"``) so image loaders
  keyed by id never mix variants up.

numpy and PIL only (no torch): rendering a thousand scenes takes about a second.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from csp_utils.world.schema import QAItem

# ------------------------------------------------------------------------- vocabulary
# Frequency-rank order: the first category is the most frequent (Zipf rank 1).
CATEGORIES = (
    "circle", "square", "triangle", "star", "cross", "heart", "diamond",
    "ring", "crescent", "arrow", "hexagon", "frame", "semicircle", "hourglass",
)
# Well separated, all bright enough to stand out on the dark backgrounds.
COLORS = {
    "red": (220, 45, 45),
    "orange": (245, 145, 30),
    "yellow": (240, 225, 50),
    "green": (50, 180, 70),
    "blue": (50, 100, 235),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below", "touching")
SPLITS = ("base", "csp", "eval")
VARIANTS = ("clean", "blur", "low_light", "small", "occlusion", "clutter")
DEGRADATIONS = VARIANTS[1:]
# Themes interleave frequency ranks (i % 4), so each theme has frequent and rare members
# and "popular" (global frequency) differs from "adversarial" (co-occurrence).
THEMES = {f"theme{t}": tuple(CATEGORIES[t::4]) for t in range(4)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

_SPLIT_KEYS = {"base": 101, "csp": 202, "eval": 303}
_DEGRADE_KEYS = {k: 1000 + i for i, k in enumerate(DEGRADATIONS)}
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


# ------------------------------------------------------------------------- shapes
def _polygon(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid (loops over edges only)."""
    inside = np.zeros(u.shape, bool)
    n = len(pts)
    for k in range(n):
        (x0, y0), (x1, y1) = pts[k], pts[(k + 1) % n]
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < xint)
    return inside


def _star_points(n=5, outer=0.98, inner=0.42):
    a = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, outer, inner)
    return list(zip(r * np.cos(a), r * np.sin(a) + 0.08))


def _shape(category: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a category on coordinates u (right), v (down), both in [-1, 1]."""
    r2 = u * u + v * v
    if category == "circle":
        return r2 <= 0.92 ** 2
    if category == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if category == "triangle":
        return _polygon(u, v, [(0, -0.92), (0.95, 0.82), (-0.95, 0.82)])
    if category == "star":
        return _polygon(u, v, _star_points())
    if category == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if category == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if category == "diamond":
        return np.abs(u) / 0.72 + np.abs(v) / 0.98 <= 1
    if category == "ring":
        return (r2 <= 0.95 ** 2) & (r2 >= 0.52 ** 2)
    if category == "crescent":
        return (r2 <= 0.92 ** 2) & ((u - 0.42) ** 2 + (v + 0.12) ** 2 >= 0.72 ** 2)
    if category == "arrow":
        shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
        return shaft | _polygon(u, v, [(0.1, -0.75), (0.97, 0), (0.1, 0.75)])
    if category == "hexagon":
        # flattened, so that a small hexagon does not pass for a small circle
        return _polygon(u, v, [(-0.97, 0), (-0.5, -0.66), (0.5, -0.66), (0.97, 0), (0.5, 0.66), (-0.5, 0.66)])
    if category == "frame":
        return (np.maximum(np.abs(u), np.abs(v)) <= 0.88) & (np.maximum(np.abs(u), np.abs(v)) >= 0.5)
    if category == "semicircle":
        return (u * u + (v - 0.4) ** 2 <= 0.95 ** 2) & (v <= 0.4)
    if category == "hourglass":
        return (np.abs(u) <= np.abs(v) * 0.95 + 0.06) & (np.abs(v) <= 0.9)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


@functools.lru_cache(maxsize=4096)
def _template(category: str, side: int, antialias: bool) -> np.ndarray:
    """(side, side) float32 alpha of a category; read-only because it is cached."""
    ss = 4 if antialias else 1
    n = side * ss
    c = (np.arange(n) + 0.5) / n * 2 - 1   # sample centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")
    a = _shape(category, u, v).astype(np.float32)
    a = a.reshape(side, ss, side, ss).mean(axis=(1, 3))
    a.setflags(write=False)
    return a


# ------------------------------------------------------------------------- rendering
def _background(spec: dict, size: int) -> np.ndarray:
    """(size, size, 3) float32 background from a JSON-able spec."""
    c0 = np.array(spec["c0"], np.float32)
    kind = spec["kind"]
    if kind == "plain":
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    c1 = np.array(spec["c1"], np.float32)
    t = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(t, t, indexing="ij")
    ramp = np.clip(xx * math.cos(spec["angle"]) + yy * math.sin(spec["angle"]) + 0.5, 0, 1)
    img = c0 + ramp[..., None] * (c1 - c0)
    if kind == "texture":  # low-frequency blotches: a coarse random grid, bilinearly upsampled
        g = np.random.default_rng(spec["texture_seed"]).uniform(-1, 1, (6, 6)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(g, "F").resize((size, size), Image.BILINEAR))
        img = img + spec["amp"] * smooth[..., None]
    return img


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


def _placement_box(cx: float, cy: float, side: int) -> tuple[int, int]:
    return int(round(cx - side / 2)), int(round(cy - side / 2))


def _render(spec: dict, layout: list[dict], size: int, antialias: bool, marks: list[dict] | None = None):
    """Paint background (+ clutter marks) and objects; returns (uint8 image, visible masks)."""
    img = _background(spec, size)
    if marks:
        img = _draw_marks(img, marks)
    full = []
    for o in layout:
        side = o["side"]
        alpha = _template(o["category"], side, antialias)
        x0, y0 = _placement_box(o["cx"], o["cy"], side)
        region = img[y0:y0 + side, x0:x0 + side]
        a = alpha[..., None]
        region *= 1 - a
        region += a * np.array(COLORS[o["color"]], np.float32)
        m = np.zeros((size, size), bool)
        m[y0:y0 + side, x0:x0 + side] = alpha >= 0.5
        full.append(m)
    return _to_uint8(img), _visible(full)


def _visible(full: list[np.ndarray]) -> list[np.ndarray]:
    covered = np.zeros_like(full[0]) if full else None
    out = []
    for m in reversed(full):
        out.append(m & ~covered)
        covered |= m
    return out[::-1]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return (0, 0, 0, 0)
    return (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)


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


# ------------------------------------------------------------------------- degradations
def degrade(scene: Scene, kind: str, severity: float, config: WorldConfig = WorldConfig()) -> Scene:
    """A natural-uncertainty variant of a clean scene; ``severity`` in [0, 1], 0 = unchanged image.

    blur       Gaussian blur, sigma up to 2.5 px at 64 px (scaled with image size).
    low_light  contrast towards the mean (down to 25%) then darkening (down to 20%).
    small      objects re-rendered about their centres at down to 35% of their side.
    occlusion  hatched grey occluders over part of each object (up to ~65% of its box);
               masks and boxes are updated to the pixels still visible.
    clutter    up to 16 distractor marks (lines, dots, scribbles), drawn behind the objects.
    Masks stay exact; category/colour/size labels keep the clean scene's values.
    ``config`` only matters for its seed (the variant's random draws).
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"degradation kind must be one of {DEGRADATIONS}, got {kind!r}")
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must lie in [0, 1], got {severity!r}")
    if scene.variant != "clean":
        raise ValueError(f"degrade expects a clean scene; {scene.scene_id} is already a {scene.variant!r} variant")
    s = float(severity)
    sid = f"{scene.scene_id}~{kind}-{s:.2f}"
    out = Scene(sid, scene.split, scene.index, scene.image.copy(), [replace(o, mask=o.mask.copy()) for o in scene.objects],
                variant=kind, severity=s, meta=json.loads(json.dumps(scene.meta)))
    if s == 0.0:
        return out
    size = scene.image.shape[0]
    # Draws depend on (seed, split, index, kind) only, never on severity: monotone in severity.
    rng = _rng(config, scene.split, scene.index, _DEGRADE_KEYS[kind])
    if kind == "blur":
        sigma = 2.5 * s * size / 64
        out.image = np.asarray(scene.to_pil().filter(ImageFilter.GaussianBlur(radius=sigma)))
    elif kind == "low_light":
        img = scene.image.astype(np.float32)
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = (mean + (img - mean) * (1 - 0.75 * s)) * (1 - 0.8 * s)
        out.image = _to_uint8(img)
    elif kind == "small":
        layout = _require_layout(scene)
        factor = 1 - 0.65 * s
        for o in layout:
            o["side"] = max(3, int(round(o["side"] * factor)))
        out.image, masks = _render(scene.meta["background"], layout, size, scene.meta.get("antialias", True))
        out.objects = _objects(layout, masks)
        out.meta["layout"] = layout
    elif kind == "clutter":
        layout = _require_layout(scene)
        marks = _clutter_marks(rng, size)[: int(round(16 * s))]
        out.image, masks = _render(scene.meta["background"], layout, size, scene.meta.get("antialias", True), marks)
        out.objects = _objects(layout, masks)
        out.meta["clutter"] = marks
    elif kind == "occlusion":
        _occlude(out, scene, rng, s)
    out.meta["degradation"] = {"kind": kind, "severity": s}
    return out


def _require_layout(scene: Scene) -> list[dict]:
    if "layout" not in scene.meta or "background" not in scene.meta:
        raise ValueError(f"scene {scene.scene_id} carries no layout in meta; re-render it with make_scene")
    return [dict(o) for o in scene.meta["layout"]]


def _clutter_marks(rng: np.random.Generator, size: int) -> list[dict]:
    marks = []
    palette = list(COLORS.values()) + [(150, 150, 150), (200, 200, 200)]
    for _ in range(16):
        kind = ("line", "dot", "scribble")[int(rng.integers(3))]
        color = [int(c) for c in palette[int(rng.integers(len(palette)))]]
        n_pts = {"line": 2, "dot": 1, "scribble": 4}[kind]
        start = rng.uniform(2, size - 2, 2)
        pts = [start]
        for _ in range(n_pts - 1):  # short strokes: marks, not shapes
            pts.append(np.clip(pts[-1] + rng.uniform(-0.2, 0.2, 2) * size, 0, size - 1))
        marks.append({"kind": kind, "color": color, "width": int(rng.integers(1, 3)),
                      "points": [[round(float(x), 2) for x in p] for p in pts]})
    return marks


def _draw_marks(img: np.ndarray, marks: list[dict]) -> np.ndarray:
    pil = Image.fromarray(_to_uint8(img), "RGB")
    d = ImageDraw.Draw(pil)
    for m in marks:
        pts = [tuple(p) for p in m["points"]]
        if m["kind"] == "dot":
            (x, y), r = pts[0], 0.5 + 0.5 * m["width"]  # 2-3 px: specks, smaller than any object
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(m["color"]))
        else:
            d.line(pts, fill=tuple(m["color"]), width=m["width"])
    return np.asarray(pil).astype(np.float32)


def _occlude(out: Scene, clean: Scene, rng: np.random.Generator, s: float) -> None:
    """Grey hatched bars over one side of each object, covering ``0.65 * s`` of its box."""
    size = clean.image.shape[0]
    draws = [(int(rng.integers(4)), float(rng.uniform(0.8, 1.0)), float(rng.uniform(95, 150))) for _ in clean.objects]

    def bars(f: float):
        occ = np.zeros((size, size), bool)
        tone = np.zeros((size, size), np.float32)
        for o, (side, jitter, grey) in zip(clean.objects, draws):
            x0, y0, x1, y1 = o.box
            w, h = int(math.ceil((x1 - x0) * f * jitter)), int(math.ceil((y1 - y0) * f * jitter))
            if w == 0 or h == 0:
                continue
            # the bar spans the box across (plus a pixel) and covers a share f of it along
            bx0, by0, bx1, by1 = [(x0 - 1, y0 - 1, x0 + w, y1 + 1), (x1 - w, y0 - 1, x1 + 1, y1 + 1),
                                  (x0 - 1, y0 - 1, x1 + 1, y0 + h), (x0 - 1, y1 - h, x1 + 1, y1 + 1)][side]
            bx0, by0 = max(0, bx0), max(0, by0)
            occ[by0:by1, bx0:bx1] = True
            tone[by0:by1, bx0:bx1] = grey
        return occ, tone

    # Bars grow with f and stay nested, so choosing the shrink at full severity (every object
    # keeps >= 15% of its pixels there) keeps that guarantee, and monotonicity, for all s.
    shrink = 1.0
    while shrink > 0.2:
        occ, _ = bars(0.65 * shrink)
        if min(((o.mask & ~occ).sum() / max(1, o.mask.sum()) for o in clean.objects), default=1.0) >= 0.15:
            break
        shrink -= 0.1
    occ, tone = bars(0.65 * s * shrink)
    yy, xx = np.mgrid[0:size, 0:size]
    shade = tone * np.where((xx + yy) % 4 < 2, 1.0, 0.8)  # hatching: a surface, not a world object
    img = clean.image.astype(np.float32)
    img[occ] = shade[occ][:, None]
    out.image = _to_uint8(img)
    for o, c in zip(out.objects, clean.objects):
        o.mask = c.mask & ~occ
        o.box = _box(o.mask)
    out.meta["occluder"] = rle_encode(occ)


# ------------------------------------------------------------------------- save / load
def rle_encode(mask: np.ndarray) -> dict:
    """Row-major run lengths, starting with a run of False (possibly 0 long)."""
    flat = np.asarray(mask, bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat.size and flat[0]:
        runs = np.concatenate([[0], runs])
    return {"shape": list(mask.shape), "counts": [int(r) for r in runs]}


def rle_decode(rle: dict) -> np.ndarray:
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(rle["shape"])


def save_scenes(scenes: Sequence[Scene], folder) -> Path:
    """``folder/images/<scene_id>.png`` plus ``folder/annotations.json``; returns the JSON path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s in scenes:
        rel = f"images/{s.scene_id}.png"
        s.to_pil().save(folder / rel)
        records.append({
            "scene_id": s.scene_id, "split": s.split, "index": s.index, "variant": s.variant,
            "severity": s.severity, "file": rel, "meta": s.meta,
            "objects": [{"category": o.category, "color": o.color, "size": o.size, "box": list(o.box),
                         "mask": rle_encode(o.mask)} for o in s.objects],
        })
    path = folder / "annotations.json"
    path.write_text(json.dumps({"format": "csp_utils.world.scenes", "version": 1, "scenes": records}))
    return path


def load_scenes(folder) -> list[Scene]:
    folder = Path(folder)
    path = folder / "annotations.json"
    if not path.exists():
        raise FileNotFoundError(f"no annotations.json in {folder}; pass the folder that save_scenes wrote")
    data = json.loads(path.read_text())
    if data.get("format") != "csp_utils.world.scenes":
        raise ValueError(f"{path} is not a scenes annotation file (format {data.get('format')!r})")
    out = []
    for r in data["scenes"]:
        img_path = folder / r["file"]
        if not img_path.exists():
            raise FileNotFoundError(f"image {img_path} listed for scene {r['scene_id']} is missing")
        image = np.asarray(Image.open(img_path).convert("RGB")).copy()
        objs = [WorldObject(o["category"], o["color"], o["size"], tuple(o["box"]), rle_decode(o["mask"]))
                for o in r["objects"]]
        out.append(Scene(r["scene_id"], r["split"], r["index"], image, objs, r["variant"], r["severity"], r["meta"]))
    return out


# ------------------------------------------------------------------------- language
def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def caption(scene: Scene) -> str:
    """Objects left to right (then top to bottom): ``"a red circle, a small blue square"``.

    "small" is said, "large" is the unmarked default.
    """
    def key(o):
        x0, y0, x1, y1 = o.box
        return (x0 + x1, y0 + y1, o.category, o.color)

    parts = []
    for o in sorted(scene.objects, key=key):
        words = (["small"] if o.size == "small" else []) + [o.color, o.category]
        parts.append(f"{article(words[0])} {' '.join(words)}")
    return ", ".join(parts)


def object_phrase(scene: Scene, i: int) -> str | None:
    """The shortest unambiguous phrase for object i: its category, else colour + category."""
    o = scene.objects[i]
    if scene.count(o.category) == 1:
        return o.category
    if sum(p.name == o.name for p in scene.objects) == 1:
        return o.name
    return None


def _question_pool(scene: Scene, rng: np.random.Generator) -> dict[tuple[str, str], list[tuple]]:
    """Candidate (question, subtype, objects) per (kind, label)."""
    pool = {(k, l): [] for k in ("existence", "attribute", "relation") for l in ("yes", "no")}
    present = sorted(scene.categories())
    absent = [c for c in CATEGORIES if c not in present]
    names = sorted({o.name for o in scene.objects})
    tmpl = ("Is there {} in the image?", "Is there {} in this image?")  # POPE and AMBER wording

    def exist(label, phrase, sub):
        t = tmpl[int(rng.integers(2))]
        pool["existence", label].append((t.format(f"{article(phrase)} {phrase}"), sub, [phrase]))

    for c in present:
        exist("yes", c, "category")
    for c in absent:
        exist("no", c, "category")
    for nm in names:
        exist("yes", nm, "color")
    for c in present:  # hard negatives: a present shape in a colour it does not have
        have = {o.color for o in scene.objects if o.category == c}
        other = [k for k in COLOR_NAMES if k not in have]
        exist("no", f"{other[int(rng.integers(len(other)))]} {c}", "color")

    for c in present:
        n = scene.count(c)
        if n == 1:
            o = next(o for o in scene.objects if o.category == c)
            wrong_color = [k for k in COLOR_NAMES if k != o.color][int(rng.integers(len(COLOR_NAMES) - 1))]
            pool["attribute", "yes"].append((f"Is the {c} {o.color}?", "color", [c]))
            pool["attribute", "no"].append((f"Is the {c} {wrong_color}?", "color", [c]))
            other_size = "small" if o.size == "large" else "large"
            pool["attribute", "yes"].append((f"Is the {c} {o.size}?", "size", [c]))
            pool["attribute", "no"].append((f"Is the {c} {other_size}?", "size", [c]))
        ask = sorted({2, 3} | ({n} if n >= 2 else set()))
        for k in ask:
            q = f"Are there {NUMBER_WORDS[k]} {plural(c)} in the image?"
            pool["attribute", "yes" if k == n else "no"].append((q, "count", [c]))

    for i in range(len(scene.objects)):
        for j in range(len(scene.objects)):
            a, b = object_phrase(scene, i), object_phrase(scene, j)
            if i == j or a is None or b is None or a == b:
                continue
            for rel in RELATIONS:
                t = relation_truth(scene, i, rel, j)
                if t is not None:
                    pool["relation", "yes" if t else "no"].append((f"Is the {a} {rel} the {b}?", rel, [a, b]))
    return pool


def world_questions(scene: Scene, rng, n: int, set_name: str = "world-train",
                    weights: dict[str, float] | None = None) -> list:
    """Up to ``n`` distinct yes/no questions about a scene, alternating yes and no.

    Kinds: existence ("Is there a circle in the image?" / "... in this image?", also with a
    colour: "Is there a red circle in the image?"), attribute (colour "Is the circle red?",
    size "Is the circle small?", count "Are there two circles in the image?") and relation
    ("Is the circle left of the star?"; ambiguous pairs are never asked). ``weights``
    picks kinds (default existence 0.5, attribute 0.25, relation 0.25) among those that
    have a question of the wanted label left. Fewer than ``n`` come back when the scene
    runs out of questions. ``rng``: a numpy Generator or an int seed.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    weights = weights or {"existence": 0.5, "attribute": 0.25, "relation": 0.25}
    pool = _question_pool(scene, rng)
    items, first = [], int(rng.integers(2))
    for k in range(n):
        want = ("yes", "no")[(k + first) % 2]
        labels = [want, "no" if want == "yes" else "yes"]
        for label in labels:  # fall back to the other label if this one is used up
            kinds = [kd for kd in weights if weights[kd] > 0 and pool[kd, label]]
            if kinds:
                break
        else:
            break
        w = np.array([weights[kd] for kd in kinds], float)
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        cands = pool[kind, label]
        q, sub, objs = cands.pop(int(rng.integers(len(cands))))
        items.append(QAItem(f"{scene.scene_id}-q{k:02d}", scene.scene_id, q, label, set_name, kind, objs, subtype=sub))
    return items


# ------------------------------------------------------------------------- training labels
def scene_labels(scene: Scene, patch: int, min_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch label grids ``(category_ids, color_ids)``, each ``(H // patch, W // patch)`` int64.

    A patch takes the object with most visible pixels in it, if those cover at least
    ``min_fraction`` of the patch; else -1 (background). Ids index ``CATEGORIES`` and
    ``COLOR_NAMES``. For supervised pre-training of the vision tower.
    """
    h, w = scene.image.shape[:2]
    if h % patch or w % patch:
        raise ValueError(f"patch {patch} must divide the image size {h}x{w}")
    gh, gw = h // patch, w // patch
    cat = np.full((gh, gw), -1, np.int64)
    col = np.full((gh, gw), -1, np.int64)
    if not scene.objects:
        return cat, col
    masks = np.stack([o.mask for o in scene.objects])
    counts = masks.reshape(len(masks), gh, patch, gw, patch).sum(axis=(2, 4))
    best = counts.argmax(axis=0)
    keep = counts.max(axis=0) >= min_fraction * patch * patch
    cat_ids = np.array([CATEGORIES.index(o.category) for o in scene.objects])
    col_ids = np.array([COLOR_NAMES.index(o.color) for o in scene.objects])
    cat[keep] = cat_ids[best[keep]]
    col[keep] = col_ids[best[keep]]
    return cat, col
