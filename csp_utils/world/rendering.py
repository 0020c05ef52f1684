"""Drawing a scene: shape templates, backgrounds, clutter marks, objects painted in order.

Each object is an alpha template (supersampled for anti-aliasing, cached per (category, side))
blended onto the background in paint order. An object's mask is ``alpha >= 0.5`` minus the
masks of objects painted later: exactly its visible pixels, and its box is the tight box of
that mask. numpy and PIL only.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from csp_utils.world.catalog import CATEGORIES, COLORS


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
