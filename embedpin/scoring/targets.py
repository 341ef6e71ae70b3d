"""Target images from files and folders (decoded by :mod:`embedpin.images`), resized to the
render size and stacked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from embedpin.errors import InputError
from embedpin.images import load_image, resize_crop

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".tga"}


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive)."""
    if not paths:
        raise InputError("no target images given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"no images in folder: {p}")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"target not found: {p}")
    return files


def load_targets(paths: Sequence[str | Path], size: tuple[int, int]) -> torch.Tensor:
    """Files and/or folders -> float32 [T, 3, H, W] sRGB in [0, 1], each resized (shorter
    side) and centre-cropped to ``size`` = (H, W)."""
    return torch.stack([resize_crop(load_image(f), size) for f in expand_paths(paths)])
