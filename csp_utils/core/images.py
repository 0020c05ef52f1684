"""One rule for turning any input image into RGB, used wherever images enter the package.

Transparency is composited onto a white background: a transparent pixel becomes white, a
half-transparent one the matching blend. This is what transformers' image processors do
(``image_transforms.convert_to_rgb``) and what image viewers show, so the pixels that are
perturbed, grounded and evaluated are the pixels the model's processor would see. PIL's own
``convert("RGB")`` instead drops the alpha channel and exposes whatever colour the
transparent pixels happen to store.

PIL images and arrays follow the same rule with the same arithmetic: an (H, W, 4) uint8
array is read as RGBA and goes through the PIL path. Grey inputs ((H, W), (H, W, 1), "L")
are repeated into three channels; palette and other modes use PIL's conversion.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

BACKGROUND = (255, 255, 255)  # where transparency is composited onto


def has_alpha(image: Image.Image) -> bool:
    """True for modes with an alpha band (RGBA, LA, PA, ...) and palette / grey images with a transparent colour."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image) -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4),
    transparency composited onto white (see the module docstring)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(to_rgb_array(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a uint8 array, got {type(image).__name__}")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return image.convert("RGB")  # a loaded copy even for RGB: callers close the file right after


def to_rgb_array(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or a uint8 array, by the same rule as :func:`to_rgb`."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(arr))))  # (H, W, 4) uint8 reads as RGBA
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8, got shape {arr.shape}")
    return arr


def png_cell(arr: np.ndarray, level: int) -> dict:
    """A uint8 image as a datasets ``Image`` cell of PNG bytes at zlib ``level``."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=level)
    return {"bytes": buf.getvalue(), "path": None}
