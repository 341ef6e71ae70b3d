"""Guide images: a path (read by :func:`embedpin.scoring.targets.load_image`) or a tensor,
as [n, 3, H, W] in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import torch

from embedpin.errors import InputError
from embedpin.images import load_image

ImageLike = str | Path | torch.Tensor


def as_image_batch(image: ImageLike) -> torch.Tensor:
    """A path or a tensor [3, H, W] / [n, 3, H, W] in [0, 1] -> [n, 3, H, W]; bad input -> InputError."""
    if isinstance(image, (str, Path)):
        return load_image(image)[None]
    if not isinstance(image, torch.Tensor):
        raise InputError(f"guide image must be a path or a tensor, got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"guide image must be [3, H, W] or [n, 3, H, W] RGB, got shape {tuple(image.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("guide image contains non-finite values")
    return x
