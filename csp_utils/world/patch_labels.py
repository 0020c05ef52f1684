"""Per-patch category and colour labels of a scene, for supervised pre-training of a vision tower."""

from __future__ import annotations

import numpy as np

from csp_utils.world.catalog import CATEGORIES, COLOR_NAMES
from csp_utils.world.scenes import Scene


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
