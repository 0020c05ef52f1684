"""Diffusion-style forward noise inside key-object masks: the "semantic perturbation" of CSP.

A target confidence c (an integer percent) becomes a diffusion step and the key objects are
noised to that step, nothing else:

    t      = round((1 - c / 100) * t_max)                       c = 100 -> t = 0 (untouched)
    abar_t = (1 - noise_gamma) ** t                             "geometric" schedule (default)
           = prod_{s <= t} (1 - beta_s), beta linear            "linear" (DDPM) schedule
    x_t    = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps        on the mask, pixels in [-1, 1]
    x_t    = x_0                                                 off the mask

then clipped to [-1, 1] and turned back into uint8. The paper (arXiv 2504.14848) does not pin
the formula down; these are our choices:

* Defaults ``noise_gamma = 0.07, t_max = 100``. ``t_max = 100`` makes one step per percent, so
  every integer confidence gets its own step and no two levels of any grid collapse through
  rounding. ``noise_gamma = 0.07`` is the smallest round value with ``abar(t_max) <= 1e-3``
  (0.93 ** 100 = 7.1e-4): at c = 0 the signal coefficient sqrt(abar) is 0.027, i.e. the object
  keeps under 3% of its contrast and is destroyed, as 0% demands. Any geometric schedule that
  reaches 1e-3 has abar halving roughly every 10 points of confidence (abar(90%) = 0.48,
  abar(50%) = 0.027), so the visible change concentrates in the upper half of the grid.
* The linear schedule uses DDPM's betas (1e-4 .. 0.02 over 1000 steps) rescaled to ``t_max``
  (beta * 1000 / t_max), which keeps DDPM's total noise; abar(t_max) = 2e-5 at t_max = 100.
* One eps per sample, drawn for the whole image from a generator seeded by (seed, sample key):
  all levels of a sample share it, so levels are nested (a lower confidence is the same noise,
  more of it), the local and global variants use the same noise, and a sample gets the same
  images whatever order or shard it is built in.
* Pixels that are not noised (off the mask, or every pixel at t = 0) are copied from the
  uint8 input, never round-tripped through floats: c = 100 is bit-identical to the input.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from csp_utils.core.images import to_rgb_array

SCHEDULES = ("geometric", "linear")
NOISE_KINDS = ("local", "global")
DEFAULT_LEVELS = tuple(range(0, 101, 10))  # integer percents, as everywhere in data and config

# DDPM (Ho et al. 2020) linear betas, defined over 1000 steps; rescaled to t_max below.
_DDPM_STEPS, _DDPM_BETA_START, _DDPM_BETA_END = 1000, 1e-4, 0.02


@dataclass
class NoiseConfig:
    noise_gamma: float = 0.07              # per-step intensity of the geometric schedule (not SimPO's simpo_gamma)
    t_max: int = 100                       # step at c = 0%
    schedule: str = "geometric"            # "geometric" | "linear"
    beta_start: float | None = None        # linear schedule only; None = DDPM's 1e-4 rescaled to t_max
    beta_end: float | None = None          # linear schedule only; None = DDPM's 0.02 rescaled to t_max
    levels: tuple[int, ...] = DEFAULT_LEVELS
    noise: str = "local"                   # "local" (inside the mask) | "global" (whole image; the ablation)
    seed: int = 0

    def __post_init__(self):
        # Checked here so that a bad config fails where it is written, not deep inside a build.
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if isinstance(self.t_max, bool) or not isinstance(self.t_max, (int, np.integer)) or self.t_max < 1:
            raise ValueError(f"t_max must be a positive integer, got {self.t_max!r}")
        if not 0.0 < float(self.noise_gamma) < 1.0:
            raise ValueError(f"noise_gamma must be in (0, 1), got {self.noise_gamma!r}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        self.levels = validate_levels(self.levels)
        steps = levels_to_steps(self.levels, self)
        if len(set(steps.tolist())) < len(steps):  # two labels, one image: almost surely a mistake
            warnings.warn(f"t_max={self.t_max} maps several confidence levels of {self.levels} to the same step "
                          f"{steps.tolist()}: their images are identical; raise t_max or use a coarser grid",
                          stacklevel=3)


def validate_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Confidence levels must be integer percents in 0..100 (no fractions, no duplicates)."""
    if isinstance(levels, (int, np.integer)):
        levels = (levels,)
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels is empty: give at least one integer percent in 0..100")
    for c in levels:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            hint = " (levels are integer percents: write 70, not 0.7)" if isinstance(c, float) else ""
            raise ValueError(f"confidence levels must be integers in 0..100, got {c!r}{hint}")
        if not 0 <= c <= 100:
            raise ValueError(f"confidence levels must be integers in 0..100, got {c!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"confidence levels contain duplicates: {levels}")
    return tuple(int(c) for c in levels)


def linear_betas(config: NoiseConfig) -> np.ndarray:
    """beta_1..beta_{t_max} of the linear schedule (float64)."""
    scale = _DDPM_STEPS / config.t_max
    start = config.beta_start if config.beta_start is not None else min(_DDPM_BETA_START * scale, 0.999)
    end = config.beta_end if config.beta_end is not None else min(_DDPM_BETA_END * scale, 0.999)
    return np.linspace(start, end, config.t_max, dtype=np.float64)


def abar(t, config: NoiseConfig | None = None):
    """Cumulative signal fraction abar_t for a step (int) or an array of steps; abar_0 = 1."""
    config = config or NoiseConfig()
    steps = np.asarray(t)
    if steps.dtype.kind not in "iu":
        raise ValueError(f"steps must be integers, got {t!r}")
    if steps.size and (steps.min() < 0 or steps.max() > config.t_max):
        raise ValueError(f"steps must be in 0..t_max={config.t_max}, got {t!r}")
    if config.schedule == "geometric":
        out = (1.0 - float(config.noise_gamma)) ** steps.astype(np.float64)
    else:
        cum = np.concatenate([[1.0], np.cumprod(1.0 - linear_betas(config))])
        out = cum[steps]
    return float(out) if np.ndim(t) == 0 else out


def levels_to_steps(levels: Sequence[int], config: NoiseConfig | None = None) -> np.ndarray:
    """Diffusion steps of integer-percent confidences: t = round((1 - c/100) * t_max), as int64."""
    config = config or NoiseConfig()
    c = np.asarray(validate_levels(levels), dtype=np.int64)
    # Integer arithmetic with round-half-to-even (Python's round), so no float error can move a step.
    q, r = np.divmod((100 - c) * int(config.t_max), 100)
    return q + ((r > 50) | ((r == 50) & (q % 2 == 1)))


def level_to_step(c: int, config: NoiseConfig | None = None) -> int:
    """Diffusion step of one integer-percent confidence: t = round((1 - c/100) * t_max)."""
    return int(levels_to_steps((c,), config)[0])


def sample_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed from (seed, sample key). Python's hash() is salted per process: not usable."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_noise(shape: tuple[int, ...], seed: int, key: str) -> torch.Tensor:
    """The sample's eps: standard normal float32, the same for every call with (shape, seed, key)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, key))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _as_uint8_rgb(image) -> np.ndarray:
    # grey is noised as RGB so every output has one layout; RGBA (PIL or array) is composited
    # onto white, as transformers' processors do (csp_utils.core.images)
    arr = np.ascontiguousarray(to_rgb_array(image))
    # PIL hands out read-only buffers, which torch.from_numpy warns about; the copy is one image.
    return arr if arr.flags.writeable else arr.copy()


def _as_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        raise ValueError("mask is None: pass a (H, W) bool mask, or use noise='global' for the whole image")
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match the image's (H, W) = {shape}")
    if m.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got {m.dtype}")
    if not m.any():  # noise on no pixel would label the unchanged image with every confidence
        raise ValueError("mask is empty (no pixel is True): there is nothing to perturb. Treat it as a grounding "
                         "failure (perturbed_dataset applies its failure_policy), or use noise='global'")
    return m


# Values per block of the kernel: L levels x 16k values of float32 scratch (~0.7 MB for 11
# levels) stay in cache across the kernel's passes; unblocked, every pass went to memory and a
# 512 px image took 3x longer.
KERNEL_BLOCK = 1 << 14


def noise_coefficients(abars) -> torch.Tensor:
    """(L, 3) float32 per-level coefficients (a, b, offset) of the uint8-space kernel below."""
    abars = np.asarray(abars, dtype=np.float64)
    a = np.sqrt(abars)
    return torch.from_numpy(np.stack([a, 127.5 * np.sqrt(1.0 - abars), 127.5 * (1.0 - a) + 0.5], 1).astype(np.float32))


def noise_kernel(pixels: torch.Tensor, eps: torch.Tensor, abars, out: torch.Tensor | None = None,
                 block: int = KERNEL_BLOCK) -> torch.Tensor:
    """Forward noise of uint8 pixels at several levels at once: (N,) uint8 -> (L, N) uint8.

    Written in uint8 space. With u the uint8 value and x_0 = u / 127.5 - 1, the noised pixel
    (x_t + 1) * 127.5 is
        a * u + b * eps + offset,  a = sqrt(abar), b = 127.5 sqrt(1 - abar), offset = 127.5 (1 - a),
    with 0.5 added to the offset so that truncation rounds to nearest; the clamp to [0, 255] is
    the clip to [-1, 1]. The levels axis is broadcast: every op covers all levels of a block of
    values. ``abars`` may be the (L, 3) ``noise_coefficients``; ``out`` a (L, N) uint8 view.

    Why int16: torch's float -> uint8 cast is ~3x slower than float -> int16 -> uint8 on CPU,
    and the clamp is cheaper on int16. Truncating toward zero then clamping equals
    clamp-then-round: anything below 0.5 ends at 0 either way.
    """
    coef = abars if isinstance(abars, torch.Tensor) else noise_coefficients(abars)
    a, b, offset = coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]
    n_levels, n = coef.shape[0], pixels.numel()
    if out is None:
        out = torch.empty((n_levels, n), dtype=torch.uint8)
    u = pixels.reshape(1, n).to(torch.float32)
    e = eps.reshape(1, n)
    if n <= block:  # one block (a 64 px image): no slicing, every call saved counts at this size
        f = torch.mul(u, a)                   # a * u
        f.addcmul_(b, e).add_(offset)         # + b * eps + offset (+ 0.5)
        out.copy_(f.to(torch.int16).clamp_(0, 255))  # truncate, clip (|values| < 32767 needs |eps| < 250)
        return out
    scratch = torch.empty((n_levels, block), dtype=torch.float32)  # reused: no page faults per block
    scratch16 = torch.empty((n_levels, block), dtype=torch.int16)
    for s in range(0, n, block):
        m = min(block, n - s)
        f, q = scratch[:, :m], scratch16[:, :m]
        torch.mul(u[:, s:s + m], a, out=f)
        f.addcmul_(b, e[:, s:s + m]).add_(offset)
        q.copy_(f)
        out[:, s:s + m].copy_(q.clamp_(0, 255))
    return out


def perturb_levels_array(
    image, mask, levels: Sequence[int] | None = None, config: NoiseConfig | None = None, key: str = ""
) -> np.ndarray:
    """All levels of one sample as one (L, H, W, 3) uint8 array (see ``perturb_levels``)."""
    config = config or NoiseConfig()
    levels = validate_levels(config.levels if levels is None else levels)
    img = _as_uint8_rgb(image)
    h, w, _ = img.shape
    if config.noise == "global":
        mask = np.ones((h, w), dtype=bool)
    mask = _as_mask(mask, (h, w))
    steps = levels_to_steps(levels, config)
    n_levels, noisy = len(levels), np.flatnonzero(steps > 0)

    src = torch.from_numpy(img)
    if noisy.size == 0:
        return src[None].repeat(n_levels, 1, 1, 1).numpy()
    coef = noise_coefficients(abar(steps[noisy], config))
    # eps is drawn for the whole image whatever the mask, so local and global share it and a
    # sample's noise does not depend on its grounding.
    eps = sample_noise((h, w, 3), config.seed, key)

    if mask.all():  # global: every pixel of a noisy level is computed, no gather / scatter
        out = torch.empty((n_levels, h * w * 3), dtype=torch.uint8)
        clean = np.flatnonzero(steps == 0)
        out[torch.from_numpy(clean)] = src.reshape(1, -1)  # untouched levels: the original bytes
        if noisy[-1] - noisy[0] + 1 == noisy.size:  # contiguous levels: write in place
            noise_kernel(src.reshape(-1), eps.reshape(-1), coef, out=out[noisy[0]:noisy[-1] + 1])
        else:
            out[torch.from_numpy(noisy)] = noise_kernel(src.reshape(-1), eps.reshape(-1), coef)
        return out.view(n_levels, h, w, 3).numpy()

    # local: start from the original at every level (the background is copied, never recomputed),
    # compute only the masked pixels, and scatter them back in one index_copy for all levels.
    out = src[None].repeat(n_levels, 1, 1, 1)
    idx = torch.from_numpy(np.flatnonzero(mask))
    pix, e = src.reshape(h * w, 3)[idx], eps.reshape(h * w, 3)[idx]
    vals = noise_kernel(pix, e, coef).view(noisy.size * idx.numel(), 3)
    rows = (torch.from_numpy(noisy)[:, None] * (h * w) + idx[None, :]).reshape(-1)  # (level, pixel) -> row
    out.view(n_levels * h * w, 3).index_copy_(0, rows, vals)
    return out.numpy()


def perturb_levels(
    image, mask, levels: Sequence[int] | None = None, config: NoiseConfig | None = None, key: str = ""
) -> list[Image.Image]:
    """Perturbed copies of ``image`` at each confidence in ``levels`` (integer percents), in order.

    ``image``: a PIL image or a uint8 array (H, W[, 1 | 3 | 4]); transparency is composited onto
    white (``csp_utils.core.images``), for PIL images and arrays alike.
    ``mask`` is the (H, W) bool key-object mask (ignored, and may be None, for noise="global").
    An empty mask raises ValueError: perturbing no pixel would return the unchanged image
    at every confidence.
    ``key`` identifies the sample (e.g. its sample id): with ``config.seed`` it fixes eps, so the
    same sample always gets the same images. All levels come from one vectorised operation.
    """
    arr = perturb_levels_array(image, mask, levels, config, key)
    return [Image.fromarray(a) for a in arr]


def perturb(image, mask, confidence: int, config: NoiseConfig | None = None, key: str = "") -> Image.Image:
    """One level; equal to the matching element of ``perturb_levels`` (same eps)."""
    return perturb_levels(image, mask, (confidence,), config, key)[0]


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A (H, W) bool mask of a box (x0, y0, x1, y1), x1/y1 exclusive, clipped to the image."""
    h, w = shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    m = np.zeros((h, w), dtype=bool)
    m[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
    if not m.any():
        raise ValueError(f"box {box} does not overlap an image of size (H, W) = {(h, w)}")
    return m


def background_max_diff(original, perturbed, mask) -> int:
    """Largest |difference| outside the mask (0 means the background is untouched)."""
    a, b = _as_uint8_rgb(original).astype(np.int16), _as_uint8_rgb(perturbed).astype(np.int16)
    outside = ~np.asarray(mask, dtype=bool)
    return int(np.abs(a - b)[outside].max(initial=0))


def masked_mse(original, perturbed, mask) -> float:
    """Mean squared difference inside the mask, on the [-1, 1] scale."""
    a = _as_uint8_rgb(original).astype(np.float64) / 127.5
    b = _as_uint8_rgb(perturbed).astype(np.float64) / 127.5
    inside = np.asarray(mask, dtype=bool)
    return float(((a - b)[inside] ** 2).mean()) if inside.any() else 0.0


def levels_grid(
    rows: Sequence[tuple],
    levels: Sequence[int] = (100, 70, 40, 10),
    config: NoiseConfig | None = None,
    show_mask: bool = True,
    panel_size: float = 2.4,
    title: str | None = None,
):
    """A matplotlib figure, one row per ``(image, mask, key[, label[, config]])``: the mask outline,
    then the image at each level. A row's own config (e.g. noise="global") overrides ``config``.

    Returns the figure; the caller shows or saves it (``plots.save_figure``).
    """
    import matplotlib.pyplot as plt

    config = config or NoiseConfig()
    levels = validate_levels(levels)
    ncols = len(levels) + int(show_mask)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(panel_size * ncols, panel_size * 1.15 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        image, mask, key = row[:3]
        label = row[3] if len(row) > 3 else None
        cfg = row[4] if len(row) > 4 and row[4] is not None else config
        img = _as_uint8_rgb(image)
        region = np.ones(img.shape[:2], bool) if cfg.noise == "global" else _as_mask(mask, img.shape[:2])
        arr = perturb_levels_array(img, region, levels, cfg, key)
        panels = list(axes[r])
        if show_mask:
            ax = panels.pop(0)
            ax.imshow(img)
            if not region.all():
                ax.contour(region, levels=[0.5], colors="yellow", linewidths=1.0)
            ax.set_title(f"{cfg.noise} mask ({region.mean():.0%})", fontsize=9)
            if label:
                ax.set_ylabel(label, fontsize=9)
        for ax, c, a in zip(panels, levels, arr):
            t = level_to_step(c, cfg)
            ax.imshow(a)
            ax.set_title(f"c = {c}%  (t = {t}, abar = {abar(t, cfg):.2g})", fontsize=9)
        if label and not show_mask:
            panels[0].set_ylabel(label, fontsize=9)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title is None:
        gamma = f"noise_gamma = {config.noise_gamma}, " if config.schedule == "geometric" else ""
        title = f"{config.schedule} schedule, {gamma}t_max = {config.t_max}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show_levels(image, mask, levels: Sequence[int] = (100, 70, 40, 10), config: NoiseConfig | None = None,
                key: str = "", title: str | None = None, show_mask: bool = True, panel_size: float = 2.4):
    """One image at each level (plus its mask outline): a one-row ``levels_grid``."""
    return levels_grid([(image, mask, key)], levels, config, show_mask, panel_size, title)


def slider_stills(image, mask, confidences: Sequence[int] = DEFAULT_LEVELS[::-1], noise_gammas: Sequence[float] = (),
                  config: NoiseConfig | None = None, key: str = "", panel_size: float = 1.2, title: str | None = None):
    """What a live view's sliders show, as stills: the image at every confidence in
    ``confidences`` (columns), once per ``noise_gammas`` value (rows; none given: ``config``'s).
    Each panel equals :func:`perturb` at that position (the same eps), so an executed copy read
    where widgets do not render (GitHub, the published ``docs/notebooks``) shows them all."""
    import matplotlib.pyplot as plt

    config = config or NoiseConfig()
    levels = validate_levels(confidences)
    configs = [replace(config, noise_gamma=g) for g in noise_gammas] or [config]
    fig, axes = plt.subplots(len(configs), len(levels), squeeze=False,
                             figsize=(panel_size * len(levels), panel_size * 1.2 * len(configs) + 0.4))
    for row, cfg in zip(axes, configs):
        for ax, c, a in zip(row, levels, perturb_levels_array(image, mask, levels, cfg, key)):
            ax.imshow(a)
            ax.set_title(f"c = {c}%", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"noise_gamma\n{cfg.noise_gamma:g}" if noise_gammas else "", fontsize=8)
    fig.suptitle(title or f"every slider position ({config.schedule} schedule, t_max = {config.t_max})", fontsize=9)
    fig.tight_layout()
    return fig
