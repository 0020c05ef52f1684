"""Scenes on disk: ``images/<scene_id>.png`` plus ``annotations.json`` with masks as run lengths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from csp_utils.world.scenes import Scene, WorldObject


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
    # the format's name, which every annotations.json carries and load_scenes checks
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
