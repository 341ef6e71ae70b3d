"""Guide images: load from a path (PIL) or accept a tensor, as [n, 3, H, W] in [0, 1].

A minimal loader kept in guidance until ``embedpin.scoring.targets.load_image`` exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embedpin.errors import InputError

ImageLike = str | Path | torch.Tensor


def load_guide_image(path: str | Path) -> torch.Tensor:
    """Read an image file -> [1, 3, H, W] float32 in [0, 1]; unreadable -> :class:`InputError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read guide image {str(path)!r}: {e.__class__.__name__}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def as_image_batch(image: ImageLike) -> torch.Tensor:
    """A path or a tensor [3, H, W] / [n, 3, H, W] in [0, 1] -> [n, 3, H, W]."""
    if isinstance(image, (str, Path)):
        return load_guide_image(image)
    if not isinstance(image, torch.Tensor):
        raise InputError(f"guide image must be a path or a tensor, got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"guide image must be [3, H, W] or [n, 3, H, W] RGB, got shape {tuple(image.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("guide image contains non-finite values")
    return x
