"""Report images: thumbnails (made once per image), per-generation frames and the GIF.

Pages show small JPEG thumbnails that link to the full-size renders, so a long run's
pages stay light; the animation is built from small palette frames cached per
generation, so adding a generation re-encodes the GIF without re-reading any render.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from embedpin.store import ASSETS, save_image

THUMB_SIZE = 128  # longest side of a page thumbnail, pixels
OWN_THUMB_BYTES = 8192  # an image that fits THUMB_SIZE and is no bigger than this is its own thumbnail
FRAME_TILE = 64  # longest side of one image inside an animation frame, pixels


def thumb_relpath(image_rel: str) -> str:
    """``"images/c00_i00.png" -> "report/thumbs/images/c00_i00.jpg"`` (relative to the same folder)."""
    return str(Path(ASSETS, "thumbs", image_rel).with_suffix(".jpg").as_posix())


def thumbnail(src: Path, dst: Path, size: int = THUMB_SIZE) -> Path | None:
    """The file a page shows for ``src``: a JPEG thumbnail at ``dst`` (made unless up to date),
    or ``src`` itself when it is already small; None when ``src`` is missing or unreadable."""
    src, dst = Path(src), Path(dst)
    try:
        src_stat = src.stat()
    except OSError:
        return None
    if dst.exists() and dst.stat().st_mtime >= src_stat.st_mtime:
        return dst
    try:
        with Image.open(src) as im:
            if src_stat.st_size <= OWN_THUMB_BYTES and max(im.size) <= size:
                return src
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    save_image(dst, im, quality=85, optimize=True)
    return dst


def frame(tiles: list[Path], dst: Path, label: str, tile: int = FRAME_TILE, columns: int = 4) -> bool:
    """One animation frame: ``tiles`` (thumbnails) in a grid with a ``label``, as a palette PNG."""
    images = []
    for p in tiles:
        try:
            im = _load(p).convert("RGB")
        except OSError:
            continue
        im.thumbnail((tile, tile))
        images.append(im)
    if not images:
        return False
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    canvas = Image.new("RGB", (cols * tile, rows * tile + 14), (255, 255, 255))
    for k, im in enumerate(images):
        canvas.paste(im, ((k % cols) * tile, (k // cols) * tile + 14))
    ImageDraw.Draw(canvas).text((3, 1), label, fill=(0, 0, 0))
    save_image(dst, canvas.quantize(colors=255, method=Image.Quantize.MEDIANCUT))
    return True


def animation(frames: list[Path], dst: Path, ms_per_frame: int = 500) -> bool:
    """A looping GIF of ``frames`` (padded to a common size); the last frame is held longer."""
    images = [_load(p) for p in frames if Path(p).exists()]
    if not images:
        return False
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    padded = []
    for im in images:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(im.convert("RGB"), (0, 0))
        padded.append(canvas.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
                      if im.size != (width, height) else im)
    durations = [ms_per_frame] * (len(padded) - 1) + [ms_per_frame * 4]
    save_image(dst, padded[0], save_all=True, append_images=padded[1:], duration=durations, loop=0,
               optimize=False, disposal=1)
    return True


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy()
