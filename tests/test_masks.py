"""Target masks (--mask): the ignored part of a target is filled from the render, ꟻLIP is averaged
under the mask, CLIP sees the mask's bounding box; loading, validation, the run folder and the report."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.micro_run import PROMPT, STAR, timeless_state
from support.micro_run import runs as _runs

from embedpin.cli import main
from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError
from embedpin.models.clip import clip_image_embeds
from embedpin.scoring.flip import DEFAULT_PPD, flip_loss
from embedpin.scoring.masks import bounding_box, fill, load_masks, masked_mean
from embedpin.scoring.scorer import Scorer

SIZE = (16, 20)
TINY = ["--inversion-steps", "2", "--generations", "1", "--population", "2", "--batch", "2", "--steps", "2",
        "--validation-seeds", "2",
        "--quiet"]


@pytest.fixture(scope="module")
def components():
    from embedpin.models.micro.arch import random_components

    return random_components(seed=0, scale=0.25)


def _left_half(size=SIZE) -> torch.Tensor:
    """[1, 1, H, W]: white on the left half, black on the right."""
    m = torch.zeros(1, 1, *size)
    m[..., : size[1] // 2] = 1
    return m


def _save(path, array: np.ndarray, mode: str | None = None):
    Image.fromarray(array, mode).save(path)
    return str(path)


def _renders(seed=0, lam=2, b=3) -> torch.Tensor:
    return torch.rand(lam, b, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


# --- scoring --------------------------------------------------------------------------


def test_targets_that_agree_inside_the_mask_score_the_same(components):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, *SIZE, generator=g)
    b = torch.where(_left_half().bool(), a, torch.rand(1, 3, *SIZE, generator=g))  # differs on the right only
    images = _renders()
    masked = [Scorer(components, t, flip_weight=1.0, clip_weight=1.0, masks=_left_half()) for t in (a, b)]
    plain = [Scorer(components, t, flip_weight=1.0, clip_weight=1.0) for t in (a, b)]
    for part in ("flip_per_image", "clip_per_image"):
        x, y = (getattr(s, part)(images) for s in masked)
        assert x.shape == (2, 3)
        assert (x - y).abs().max() <= 1e-6, part
        u, v = (getattr(s, part)(images) for s in plain)
        assert (u - v).abs().max() > 1e-3, part  # without the mask the right half counts
    assert torch.allclose(masked[0](images).loss, masked[1](images).loss, atol=1e-6)


def test_a_white_mask_scores_exactly_as_no_mask(components):
    targets = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    white = torch.ones(2, 1, *SIZE)
    images = _renders(3)
    kw = dict(flip_weight=1.0, clip_weight=0.5, std_weight=0.5)
    with_mask, without = Scorer(components, targets, masks=white, **kw), Scorer(components, targets, **kw)
    r, s = with_mask(images), without(images)
    assert torch.equal(r.loss, s.loss) and torch.equal(r.per_image, s.per_image)
    assert torch.equal(r.flip, s.flip) and torch.equal(r.clip, s.clip)
    flat = images.flatten(0, 1)
    assert torch.equal(with_mask.error_maps(flat), without.error_maps(flat))


def test_masked_flip_is_the_mean_error_under_the_mask_against_the_filled_target():
    g = torch.Generator().manual_seed(4)
    target, renders = torch.rand(1, 3, *SIZE, generator=g), torch.rand(2, 1, 3, *SIZE, generator=g)
    mask = _left_half()
    got = Scorer(None, target, masks=mask, ppd=DEFAULT_PPD).flip_per_image(renders)
    flat = renders.flatten(0, 1)
    filled = torch.cat((target[..., :, : SIZE[1] // 2].expand(2, -1, -1, -1), flat[..., SIZE[1] // 2:]), -1)
    _, maps = flip_loss(flat, filled, DEFAULT_PPD, return_maps=True)
    expected = maps[..., : SIZE[1] // 2].mean((-2, -1))  # the plain mean over the pinned half
    assert torch.allclose(got.flatten(), expected, atol=1e-6)
    assert not torch.allclose(expected, maps.mean((-2, -1)), atol=1e-4)


def test_grey_is_a_weight():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    assert masked_mean(maps, mask).item() == pytest.approx((1 + 0.5 * 2) / 1.5)
    target, render = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert fill(target, render, mask)[0, 0].tolist() == [[1.0, 0.5], [0.0, 0.0]]


def test_clip_sees_the_masks_bounding_box(components):
    mask = torch.zeros(1, 8, 10)
    mask[0, 2:5, 3] = 0.5
    mask[0, 4, 7] = 1
    assert bounding_box(mask) == (slice(2, 5), slice(3, 8))
    g = torch.Generator().manual_seed(5)
    target, images = torch.rand(1, 3, *SIZE, generator=g), torch.rand(4, 3, *SIZE, generator=g)
    box = torch.zeros(1, 1, *SIZE)
    box[..., 3:11, 4:16] = 1  # a rectangle: CLIP compares the crops themselves
    got = Scorer(components, target, flip_weight=0.0, clip_weight=1.0, masks=box).clip_masked(images)
    crops = clip_image_embeds(components, torch.cat((images[..., 3:11, 4:16], target[..., 3:11, 4:16])))
    assert torch.allclose(got, 1 - crops[:4] @ crops[4], atol=1e-6)


# --- loading and validation -----------------------------------------------------------


def test_a_mask_is_resized_with_its_target_and_a_differently_sized_one_gets_a_note(tmp_path):
    target = _save(tmp_path / "t.png", np.zeros((30, 40, 3), np.uint8))
    same = np.zeros((30, 40), np.uint8)
    same[:, :20] = 255
    out = load_masks([_save(tmp_path / "same.png", same, "L")], [target], SIZE)
    assert out.masks.shape == (1, 1, *SIZE) and out.notes == []
    assert out.masks[0, 0, :, :8].min() == 1 and out.masks[0, 0, :, 12:].max() == 0
    other = _save(tmp_path / "small.png", np.full((15, 20), 255, np.uint8), "L")
    out = load_masks([other], [target, target], SIZE)
    assert out.masks.shape == (2, 1, *SIZE) and len(out.notes) == 1
    assert "small.png" in out.notes[0] and "resized from 20x15" in out.notes[0]


def test_an_all_black_mask_is_a_config_error(tmp_path):
    target = _save(tmp_path / "t.png", np.zeros((16, 16, 3), np.uint8))
    black = _save(tmp_path / "black.png", np.zeros((16, 16), np.uint8), "L")
    with pytest.raises(ConfigError, match="ignores the whole image"):
        load_masks([black], [target], SIZE)


def _config(targets=(), masks=()) -> RunConfig:
    cfg = RunConfig()
    cfg.prompt.prompt, cfg.score.targets, cfg.score.masks = "x", list(targets), list(masks)
    return cfg


def test_mask_counts_and_files_are_checked(tmp_path):
    t = _save(tmp_path / "t.png", np.zeros((16, 16, 3), np.uint8))
    m = _save(tmp_path / "m.png", np.full((16, 16), 255, np.uint8), "L")
    _config([t, t], [m]).validate()
    _config([t, t], [m, m]).validate()
    with pytest.raises(ConfigError, match="got 3 masks for 2 targets"):
        _config([t, t], [m, m, m]).validate()
    with pytest.raises(ConfigError, match="--mask needs --target"):
        _config([], [m]).validate()
    with pytest.raises(InputError, match="mask not found"):
        _config([t], [str(tmp_path / "no.png")]).validate()
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        _save(folder / f"{i}.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ConfigError, match="got 3 masks for 2 targets"):  # a folder's images counted at loading
        load_masks([m, m, m], [folder], SIZE)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        load_masks([str(tmp_path / "bad.png")], [t], SIZE)


def test_the_python_api_takes_masks(tmp_path):
    from embedpin.api import run_config

    mask = _save(tmp_path / "m.png", np.full((8, 8), 255, np.uint8), "L")
    assert run_config(target=[STAR, STAR], mask=mask, prompt="x").score.masks == [mask]


def test_masks_round_trip_through_config_toml(tmp_path):
    cfg = _config(["a.png", "b.png"], ["ma.png", "mb.png"])
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    assert RunConfig.from_toml(tmp_path / "config.toml").score.masks == ["ma.png", "mb.png"]


# --- the command and the run folder -----------------------------------------------------


def _argv(out, *extra):
    return ["optimize", "--target", STAR, "--prompt", PROMPT, "--out", str(out), *TINY, *extra]


@pytest.mark.parametrize("make, words", [
    (lambda d: ["--mask", _save(d / "black.png", np.zeros((64, 64), np.uint8), "L")], "ignores the whole image"),
    (lambda d: ["--mask", STAR, "--mask", STAR], "got 2 masks for 1 targets"),
    (lambda d: ["--mask", str(d / "missing.png")], "mask not found"),
])
def test_a_bad_mask_is_one_error_line_and_no_run(tmp_path, capsys, make, words):
    assert main(_argv(tmp_path / "runs", *make(tmp_path))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert _runs(tmp_path / "runs") == []


def test_mask_without_target_is_a_config_error(tmp_path, capsys):
    mask = _save(tmp_path / "m.png", np.full((64, 64), 255, np.uint8), "L")
    argv = ["optimize", "--prompt", PROMPT, "--out", str(tmp_path / "runs"), *TINY, "--mask", mask]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mask needs --target" in err[0]


def test_a_masked_run_keeps_the_mask_beside_its_target_and_the_report_shows_it(tmp_path, capsys):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255  # the star's centre; a different size than star.png (64x64)
    path = _save(tmp_path / "centre.png", mask, "L")
    assert main([a for a in _argv(tmp_path / "runs", "--mask", path) if a != "--quiet"]) == 0  # notes show
    assert "note: mask centre.png resized from 32x32" in capsys.readouterr().err
    (run,) = _runs(tmp_path / "runs")
    saved = np.asarray(Image.open(run / "targets" / "mask_00.png"))
    assert saved.shape == (64, 64) and saved[32, 32] == 255 and saved[2, 2] == 0
    assert RunConfig.from_toml(run / "config.toml").score.masks == [path]
    page = (run / "index.html").read_text()
    assert "targets/mask_00.png" in page and "resized from 32x32" in page
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished"


# --- the promise: what is black in a mask steers nothing ---------------------------------
# Two targets that agree where the mask is white and differ where it is black give identical runs:
# state.json (but for its clocks), every generation's records, images and error maps, the report's
# figures, the pinned tensors and the token analysis, bitwise.

PAIR = ["--prompt", "a star", "--inversion-steps", "3", "--vectors", "1", "--population", "3", "--batch", "2", "--steps", "2",
        "--validation-seeds", "2", "--quiet"]  # 3 tokens: a short token analysis


def _pair(tmp_path, alpha: bool) -> tuple[str, str, str]:
    """(target a, target b, mask): star.png, and star.png with its outside (the mask's black) in other
    colours; with ``alpha`` both carry the mask as their transparency, saved under the same file name."""
    star = np.asarray(Image.open(STAR).convert("RGB"))
    mask = np.zeros(star.shape[:2], np.uint8)
    mask[12:52, 12:52] = 255
    other = np.where(mask[..., None] > 0, star, 255 - star[::-1])  # outside: flipped and inverted
    paths = []
    for name, rgb in (("a", star), ("b", other)):
        (tmp_path / name).mkdir()
        image = np.dstack([rgb, mask]) if alpha else rgb
        paths.append(_save(tmp_path / name / "target.png", image.astype(np.uint8), "RGBA" if alpha else "RGB"))
    return paths[0], paths[1], _save(tmp_path / "mask.png", mask, "L")



def _files(run) -> list:
    """Every record, image and figure of a run folder (not config.toml and inputs.json: they name the input files)."""
    return sorted(p.relative_to(run) for p in run.rglob("*")
                  if p.is_file() and p.suffix in (".json", ".png", ".gif") and p.name not in ("state.json", "inputs.json"))


def _same_run(a, b) -> None:
    from embedpin.exports import load_pinned

    assert timeless_state(a / "state.json") == timeless_state(b / "state.json")
    assert _files(a) == _files(b)
    for rel in _files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    (ta, _), (tb, _) = load_pinned(a), load_pinned(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _run(out, target, *extra) -> object:
    assert main(["optimize", "--target", target, "--out", str(out), *PAIR, *extra]) == 0
    (run,) = _runs(out)
    return run


def _ctrl_c_twice_when(pattern: str, out) -> threading.Thread:
    """Press Ctrl-C twice (SIGINT to this process) once a path matching ``pattern`` exists under ``out``."""
    def press():
        while not list(out.glob(pattern)):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread


def test_transparent_targets_that_agree_where_opaque_give_identical_runs_also_resumed(tmp_path, capsys):
    """The defaults (token vectors started at the word CLIP ranks for the target, token weights,
    the target as guide image): RGBA targets, their alpha the mask (said on stderr). The second run
    is stopped by Ctrl-C twice inside its last generation and resumed; its token analysis too."""
    a, b, _ = _pair(tmp_path, alpha=True)
    first = _run(tmp_path / "runs-a", a, "--generations", "2")
    out = tmp_path / "runs-b"
    press = _ctrl_c_twice_when("*/generations/.0001.tmp/images", out)
    assert main(["optimize", "--target", b, "--out", str(out), *PAIR, "--generations", "2"]) == 130
    press.join(timeout=10)
    (second,) = _runs(out)
    stopped = json.loads((second / "state.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["generation"] == 1
    assert "stopping after this generation" in capsys.readouterr().out  # (the first Ctrl-C)
    assert main(["optimize", "--resume", str(second)]) == 0
    assert "note: target.png: transparency is the mask" in capsys.readouterr().err
    for run in (first, second):
        assert main(["analyze", str(run), "--json"]) == 0
    _same_run(first, second)
    assert json.loads((first / "state.json").read_text())["generation"] == 2


def test_masked_targets_give_identical_runs_with_every_other_block_and_different_ones_without(tmp_path):
    """The blocks the defaults leave out: the conditioning delta in the targets' image basis, CFG and
    img2img strength, scored with the CLIP loss too. Without the mask the same pair gives different
    runs (the test can fail)."""
    a, b, mask = _pair(tmp_path, alpha=False)
    blocks = ["--generations", "1", "--validation-seeds", "0", "--blocks", "delta,cfg,strength", "--basis", "image",
              "--clip-weight", "0.5", "--init-image", str(Path(STAR).with_name("circle.png"))]
    _same_run(*(_run(tmp_path / f"masked-{n}", t, *blocks, "--mask", mask) for n, t in (("a", a), ("b", b))))
    plain = [_run(tmp_path / f"plain-{n}", t, *blocks) for n, t in (("a", a), ("b", b))]
    losses = [[c["loss"] for c in json.loads((r / "generations" / "0000" / "generation.json").read_text())["candidates"]]
              for r in plain]
    assert losses[0] != losses[1]
