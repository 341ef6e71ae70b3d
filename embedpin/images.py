"""Image files in, float RGB tensors out, and the one resize every stage uses.

Every odd image a user may hand us is normalised: alpha composited on white (and readable on its
own, :func:`load_alpha`: a target's transparency is its mask), greyscale
and palette expanded, 16-bit scaled (not clipped), EXIF orientation applied. The pixel
count is checked from the header before decoding (decompression bombs); every bad input
raises :class:`~embedpin.errors.InputError` with a one-line message. This module sits at
the bottom of the stages: guidance (guide and init images), scoring (targets) and CLIP
preprocessing all decode and resize through it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from embedpin.errors import InputError

MAX_PIXELS = 50_000_000


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Decoded PIL image -> float32 [H, W, 3] in [0, 1]."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit greyscale: scale, don't clip
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    if im.mode == "F":
        return np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _decoded(path: str | Path) -> Image.Image:
    """One image file decoded (EXIF orientation applied), or an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"image file is empty: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise InputError(f"image too large ({w}x{h} > {MAX_PIXELS // 1_000_000} Mpx): {path}")
                im.load()
                return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise InputError(f"not an image (or an unsupported format): {path}") from None
    except Image.DecompressionBombError:
        raise InputError(f"image too large (decompression bomb guard): {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read image (truncated or corrupt?) {path}: {detail}") from None


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def load_image(path: str | Path) -> torch.Tensor:
    """One image file -> float32 [3, H, W] sRGB in [0, 1] (see module docstring)."""
    rgb = _to_rgb_array(_decoded(path))
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def load_alpha(path: str | Path) -> torch.Tensor | None:
    """An image file's transparency as float32 [1, H, W] in [0, 1] (1: opaque); None when every
    pixel is opaque (or the format has no alpha)."""
    im = _decoded(path)
    if not _has_alpha(im):
        return None
    alpha = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
    return None if alpha.min() >= 1 else torch.from_numpy(np.ascontiguousarray(alpha))[None]


def resize_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., 3, h, w] -> [..., 3, H, W]: scale the shorter side to cover, then centre-crop
    (antialiased bicubic, clamped to [0, 1])."""
    h, w = image.shape[-2:]
    out_h, out_w = size
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    x = image.reshape(-1, *image.shape[-3:])
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[..., top:top + out_h, left:left + out_w].clamp(0, 1)
    return x.reshape(*image.shape[:-2], out_h, out_w)
