"""The render size: a width and a height the model can take, from what the user gave.

A model takes sizes in multiples of its VAE's downsampling times its UNet's (SD: 8 x 8 = 64
pixels), so that every UNet level has whole latents. Unless both sides are given, the size
keeps an aspect ratio (the first target's, else the init image's, else square) at the model's
native area (512² SD 1.x, 768² SD 2.x v-prediction, 1024² SDXL), each side rounded to the
nearest multiple; one given side fixes the scale instead of the area.
"""

from __future__ import annotations

import math

from embedpin.config import RenderConfig
from embedpin.errors import ConfigError


def size_multiple(components) -> int:
    """Pixels per step of a valid side: the VAE factor times the UNet's downsampling."""
    return components.vae_scale_factor * 2 ** (len(components.unet.config.block_out_channels) - 1)


def _round(side: float, multiple: int) -> int:
    return int(round(side / multiple)) * multiple


def _check(name: str, side: int, multiple: int) -> int:
    if side % multiple or side < multiple:
        near = max(multiple, _round(side, multiple))
        raise ConfigError(f"--{name} {side} is not a multiple of {multiple} (this model's VAE x UNet factor); "
                          f"try {near}")
    return side


def render_size(settings: RenderConfig, native: int, multiple: int, aspect: float | None = None) -> tuple[int, int]:
    """(height, width) for the run: ``settings``' --size / --width / --height, the rest from
    ``aspect`` (width / height; None: square) at the native area ``native``²."""
    if settings.size is not None:
        return _check("size", settings.size, multiple), _check("size", settings.size, multiple)
    aspect = aspect or 1.0
    w, h = settings.width, settings.height
    if w is not None and h is not None:
        return _check("height", h, multiple), _check("width", w, multiple)
    if w is not None:
        _check("width", w, multiple)
        h = _round(w / aspect, multiple)
    elif h is not None:
        _check("height", h, multiple)
        w = _round(h * aspect, multiple)
    else:
        w, h = _round(native * math.sqrt(aspect), multiple), _round(native / math.sqrt(aspect), multiple)
    if min(w, h) < multiple:
        r = f"{max(aspect, 1 / aspect):,.2f}".rstrip("0").rstrip(".")
        ratio = f"{r}:1" if aspect >= 1 else f"1:{r}"
        raise ConfigError(f"an aspect ratio of {ratio} cannot fit this model at that scale (a side would be under "
                          f"{multiple} px): pass --width and --height")
    return h, w
