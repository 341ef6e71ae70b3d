"""The bytes of a run folder's files: atomic writes, JSON / safetensors / text IO, image
encoding with the preview policy of large runs, and file digests.

Every write is atomic (a temporary file in the same folder, then ``os.replace``): a reader
(a browser refreshing the page, a second ``embedpin report``) sees the old file or the new
one, never half of one. Tensors are safetensors and state is JSON: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from embedpin.config import RunConfig
from embedpin.errors import InputError
from embedpin.store.layout import STATE


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_vectors(path: Path, vectors: np.ndarray) -> Path:
    """Token vectors [N, Din] as a safetensors file (``vectors``), atomically."""
    from safetensors.numpy import save

    return write_bytes(path, save({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}))


def read_vectors(path: Path) -> np.ndarray:
    """Token vectors [N, Din] written by :func:`write_vectors` (an InputError if unreadable)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))["vectors"]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: the run's inversion vectors cannot be read ({e}); remove 'inversion' from "
                         f"{STATE} to fit them again") from None


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj, allow_nan: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically (``allow_nan``: Infinity/NaN allowed)."""
    return write_text(path, json.dumps(obj, indent=1, allow_nan=allow_nan))


def save_image(path: Path, image, **params) -> Path:
    """Save a PIL image atomically; the format follows the suffix (``.png``, ``.jpg``, ``.gif``)."""
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), Path(path).suffix[1:].upper())
    image.save(buf, format=fmt, **params)
    return write_bytes(path, buf.getvalue())


def save_figure(path: Path, figure, **params) -> Path:
    """Save a matplotlib figure atomically; the format follows the suffix."""
    buf = io.BytesIO()
    figure.savefig(buf, format=Path(path).suffix[1:], **params)
    return write_bytes(path, buf.getvalue())


def to_uint8(images) -> np.ndarray:
    """Images [..., 3, H, W] (torch or numpy, float in [0, 1]) as uint8 [..., H, W, 3], rounded as
    their PNGs store them (a single-channel [H, W] stays [H, W])."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.moveaxis(arr, -3, -1) if arr.ndim >= 3 and arr.shape[-3] in (1, 3) else arr


def _pil(image) -> Image.Image:
    """An image [3, H, W] (torch or numpy, float in [0, 1]), or uint8 [H, W, 3] as :func:`to_uint8`
    gives, as PIL (the same picture either way)."""
    arr = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else to_uint8(image)
    return Image.fromarray(arr.squeeze())


def save_png(path: str | Path, image) -> Path:
    """Write an image as PNG, atomically (:func:`_pil`'s inputs)."""
    return save_image(path, _pil(image))


# A render's preview: what the report shows of every image of a large run (``--keep-images
# best``), a lossy WebP whose longest side is PREVIEW_SIDE (measured on 512² photographs: about
# 5 KB, against 380 KB for the PNG). Renders of FULL_AREA pixels and more keep previews.
PREVIEW_SIDE, PREVIEW_QUALITY, PREVIEW = 192, 75, ".webp"
FULL_AREA = 256 * 256


def save_preview(path: str | Path, image) -> Path:
    """Write an image's preview (:data:`PREVIEW_SIDE`, WebP), atomically."""
    im = _pil(image).convert("RGB")
    im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return save_image(path, im, quality=PREVIEW_QUALITY, method=6)


def keeps_previews(config: RunConfig) -> bool:
    """Whether the run keeps previews (and full PNGs of each generation's best only): at
    :data:`FULL_AREA` and up, unless ``--keep-images all``."""
    r = config.render
    return config.keep_images != "all" and (r.height or 0) * (r.width or 0) >= FULL_AREA


def save_render(folder: Path, rel: str, image, previews: bool, full: bool = False) -> tuple[str, str | None]:
    """Write one render under ``folder``: ``rel`` (a ``.png`` path) as a PNG, or, with
    ``previews``, as a preview beside it and the PNG only when ``full``. Returns (the file the
    report shows, the full-size PNG or None), relative to ``folder``."""
    if not previews:
        save_png(folder / rel, image)
        return rel, None
    shown = Path(rel).with_suffix(PREVIEW).as_posix()
    save_preview(folder / shown, image)
    if full:
        save_png(folder / rel, image)
    return shown, rel if full else None


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or an InputError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"missing run file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable run file {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"malformed run file {path}: expected a JSON object")
    return data


def file_digest(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes (hex), None when there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
