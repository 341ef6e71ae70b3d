"""Target loading: odd image modes are normalised, bad inputs raise one-line InputErrors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from embedpin.errors import InputError
from embedpin.images import MAX_PIXELS, load_image, resize_crop
from embedpin.scoring.targets import load_targets


def _px(x: torch.Tensor, y: int, xx: int) -> list[float]:
    return [round(v, 3) for v in x[:, y, xx].tolist()]


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red, transparent except one opaque and one half-transparent pixel
    a[0, 0, 3], a[0, 1, 3] = 255, 128
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png")
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert _px(x, 0, 0) == [1.0, 0.0, 0.0]
    assert _px(x, 1, 1) == [1.0, 1.0, 1.0]
    assert _px(x, 0, 1)[1] == pytest.approx(127 / 255, abs=0.01)


def test_greyscale_and_la_become_rgb(tmp_path):
    Image.fromarray(np.full((3, 5), 51, np.uint8), "L").save(tmp_path / "l.png")
    Image.fromarray(np.dstack([np.zeros((3, 5), np.uint8), np.zeros((3, 5), np.uint8)]), "LA").save(tmp_path / "la.png")
    assert _px(load_image(tmp_path / "l.png"), 2, 4) == [0.2, 0.2, 0.2]
    assert _px(load_image(tmp_path / "la.png"), 0, 0) == [1.0, 1.0, 1.0]  # fully transparent -> white


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 16384, 32768, 65535]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = load_image(tmp_path / "g16.png")
    assert x[0, 0].tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0], abs=1e-4)
    assert torch.equal(x[0], x[2])


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    x = load_image(tmp_path / "p.png")
    assert _px(x, 0, 0) == [1.0, 1.0, 1.0] and _px(x, 0, 1) == [0.0, 1.0, 0.0]


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (6, 2), "red")
    im.putpixel((0, 0), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.png", exif=exif)
    x = load_image(tmp_path / "rot.png")
    assert x.shape == (3, 6, 2)
    assert _px(x, 0, 1) == [0.0, 0.0, 1.0]  # top-left pixel ends up top-right


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    x = load_image(tmp_path / "cmyk.jpg")
    assert x.shape == (3, 4, 4) and x[0].min() > 0.9 and x[1:].max() < 0.1


def test_resize_crop_covers_then_centre_crops():
    thirds = torch.eye(3).repeat_interleave(8, 1)[:, None].expand(3, 8, 24)  # red | green | blue
    assert torch.equal(resize_crop(thirds, (8, 8)), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 8, 8))
    halves = torch.zeros(3, 4, 12)
    halves[:, :, 6:] = 1.0  # black | white, upscaled x2 to 8x24, then the middle 8 columns
    out = resize_crop(halves, (8, 8))
    assert out.shape == (3, 8, 8) and out[:, :, :2].max() < 0.05 and out[:, :, 6:].min() > 0.95
    assert resize_crop(torch.rand(2, 3, 5, 7), (5, 5)).shape == (2, 3, 5, 5)


def test_load_targets_from_files_and_folders(tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    for name, colour in (("b.png", "blue"), ("a.png", "red")):
        Image.new("RGB", (20, 10), colour).save(folder / name)
    (folder / "notes.txt").write_text("not an image, ignored in folders")
    Image.new("RGB", (10, 30), "lime").save(tmp_path / "g.png")
    t = load_targets([folder, tmp_path / "g.png"], (8, 6))
    assert t.shape == (3, 3, 8, 6)
    assert [_px(im, 4, 3) for im in t] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]  # sorted


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.png"


def _file(name: str, data: bytes):
    def make(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return make


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.png", "not found"),
    (_file("empty.png", b""), "empty"),
    (_file("text.png", b"hello"), "not an image"),
    (_truncated, "truncated or corrupt"),
    # 60 Mpx declared, no pixel data: "too large" (not "truncated") shows the header check runs first
    (_file("bomb.png", _png_header(10_000, 6_000)), "too large"),
])
def test_bad_image_files_raise_one_line_input_errors(tmp_path, make, match):
    path = make(tmp_path)
    assert 10_000 * 6_000 > MAX_PIXELS
    with pytest.raises(InputError, match=match) as err:
        load_targets([path], (8, 8))
    assert "\n" not in str(err.value) and path.name in str(err.value)


def test_empty_folder_and_empty_list(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images in folder: .*empty_dir"):
        load_targets([tmp_path / "empty_dir"], (8, 8))
    with pytest.raises(InputError, match="no target images"):
        load_targets([], (8, 8))


def _empty_dir(folder):
    (folder / "empty_dir").mkdir()
    return folder / "empty_dir"


@pytest.mark.parametrize("make, match", [
    (_file("empty.png", b""), "empty"),
    (_file("text.png", b"hello"), "not an image"),
    (_truncated, "truncated or corrupt"),
    (_file("bomb.png", _png_header(10_000, 6_000)), "too large"),
    (_empty_dir, "no images in folder"),
])
def test_cli_bad_target_is_one_error_line_and_no_run(tmp_path, capsys, make, match):
    from embedpin.cli import main

    path = make(tmp_path)
    argv = ["optimize", "--target", str(path), "--prompt", "a red circle", "--out", str(tmp_path / "runs"),
            "--inversion-steps", "2", "--generations", "1", "--population", "2", "--batch", "1", "--steps", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0] and path.name in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
