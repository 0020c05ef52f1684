"""Natural-uncertainty variants of a clean scene: blur, low light, small objects, occlusion, clutter
(the suite's transfer sets), and haze, pixelation and JPEG compression (held out of the suite).

:func:`degrade` makes them with a severity in [0, 1]; 0 leaves the image unchanged, and the
random draws do not depend on severity, so images change monotonically with it. None of them
uses Gaussian pixel noise (that is CSP's perturbation, in ``csp_utils.dataset.csp_noise``). A
variant's ``scene_id`` gets a suffix (``"eval-000042~blur-0.50"``) so image loaders keyed by id
never mix variants up.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
from PIL import Image, ImageFilter

from csp_utils.world.catalog import COLORS, DEGRADATIONS, HELD_OUT_DEGRADATIONS
from csp_utils.world.rendering import _box, _render, _to_uint8
from csp_utils.world.scene_io import rle_encode
from csp_utils.world.scenes import Scene, WorldConfig, _objects, _rng

_DEGRADE_KEYS = {k: 1000 + i for i, k in enumerate(DEGRADATIONS + HELD_OUT_DEGRADATIONS)}


def degrade(scene: Scene, kind: str, severity: float, config: WorldConfig = WorldConfig()) -> Scene:
    """A natural-uncertainty variant of a clean scene; ``severity`` in [0, 1], 0 = unchanged image.

    blur       Gaussian blur, sigma up to 2.5 px at 64 px (scaled with image size).
    low_light  contrast towards the mean (down to 25%) then darkening (down to 20%).
    small      objects re-rendered about their centres at down to 35% of their side.
    occlusion  hatched grey occluders over part of each object (up to ~65% of its box);
               masks and boxes are updated to the pixels still visible.
    clutter    up to 16 distractor marks (lines, dots, scribbles), drawn behind the objects.
    haze       a blend towards light grey, up to 75% (fog: contrast lost, brightness gained).
    pixelate   blocks of up to 8 px at 64 px (scaled with image size), nearest-neighbour.
    jpeg       JPEG compression at quality 60 down to 3 (blocking and colour bleeding).
    Masks stay exact; category/colour/size labels keep the clean scene's values.
    ``config`` only matters for its seed (the variant's random draws).
    """
    if kind not in DEGRADATIONS + HELD_OUT_DEGRADATIONS:
        raise ValueError(f"degradation kind must be one of {DEGRADATIONS + HELD_OUT_DEGRADATIONS}, got {kind!r}")
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
    elif kind == "haze":
        out.image = _to_uint8(scene.image.astype(np.float32) * (1 - 0.75 * s) + 200.0 * 0.75 * s)
    elif kind == "pixelate":
        block = 1 + 7 * s * size / 64
        small = max(1, int(round(size / block)))
        pil = scene.to_pil()
        out.image = np.asarray(pil.resize((small, small), Image.BILINEAR).resize((size, size), Image.NEAREST))
    elif kind == "jpeg":
        buf = io.BytesIO()
        scene.to_pil().save(buf, format="JPEG", quality=int(round(60 - 57 * s)))
        out.image = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
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
