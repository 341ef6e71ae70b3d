"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A reader (a browser refreshing the page, a second ``embedpin report``) sees either the
old file or the new one, never a half-written one, and a killed process leaves no
temporary file behind except in the instant between write and rename.
"""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path


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


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


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
