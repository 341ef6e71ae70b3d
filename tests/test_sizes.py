"""Real checkpoints as users run them: any width x height, the model's own defaults, a run
folder that stays small at real sizes, exact re-renders of any report image, batches that
fit the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedpin.cli import main
from embedpin.config import RenderConfig
from embedpin.errors import ConfigError
from embedpin.render.memory import batch_for_memory, in_chunks
from embedpin.render.size import render_size

ROOT = Path(__file__).resolve().parents[1]
STAR = str(ROOT / "examples" / "star.png")


@pytest.mark.parametrize("settings, aspect, want", [
    (dict(), None, (512, 512)),
    (dict(), 4 / 3, (448, 576)),           # the target's ratio at the native area, sides rounded to 64
    (dict(), 2 / 3, (640, 448)),
    (dict(size=768), 4 / 3, (768, 768)),   # --size: a square
    (dict(width=768), 3 / 2, (512, 768)),  # one side fixes the scale
    (dict(height=512), 3 / 2, (512, 768)),
    (dict(width=768, height=512), None, (512, 768)),
])
def test_render_size(settings, aspect, want):
    assert render_size(RenderConfig(**settings), 512, 64, aspect) == want


@pytest.mark.parametrize("settings, aspect, says", [
    (dict(width=500, height=512), None, "--width 500 is not a multiple of 64"),
    (dict(size=520), None, "try 512"),
    (dict(), 1000.0, "an aspect ratio of 1,000:1 cannot fit"),
    (dict(height=64), 1 / 8, "1:8 cannot fit"),
])
def test_sizes_that_cannot_be_rendered_are_refused(settings, aspect, says):
    with pytest.raises(ConfigError, match=says):
        render_size(RenderConfig(**settings), 512, 64, aspect)


def _optimize(out, *extra):
    return ["optimize", "--target", STAR, "--prompt", "a star", "--out", str(out), "--inversion-steps", "2",
            "--inversion-batch", "2", "--generations", "1",
            "--population", "2", "--batch", "2", "--steps", "2", "--validation-seeds", "1", "--quiet", *extra]


@pytest.mark.parametrize("extra, says", [
    (["--width", "70"], "--width 70 is not a multiple of 16"),
    (["--size", "64", "--width", "64"], "give --size (a square) or --width / --height, not both"),
    (["--keep-images", "some"], "invalid choice: 'some'"),
    (["--max-batch", "lots"], "not a number or auto"),
])
def test_bad_sizes_and_store_settings_are_one_error_line(tmp_path, capsys, extra, says):
    assert main(_optimize(tmp_path / "runs", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A micro run whose target is 4:3, with emphasis in the prompt."""
    d = tmp_path_factory.mktemp("wide")
    Image.open(STAR).resize((96, 72)).save(d / "wide.png")
    args = _optimize(d / "runs")
    args[args.index(STAR)] = str(d / "wide.png")
    assert main(args) == 0
    (run,) = list((d / "runs").iterdir())
    return run


def test_a_run_takes_its_size_and_defaults_from_the_target_and_the_model(wide_run, tmp_path):
    from embedpin.config import RunConfig
    from embedpin.exports import load_pinned

    config = RunConfig.from_toml(wide_run / "config.toml")
    assert (config.render.height, config.render.width) == (48, 80)  # 4:3 at micro's 64² area, multiples of 16
    assert (config.render.steps, config.render.cfg, config.render.scheduler) == (2, 5.0, "dpm++2m")
    assert config.render.max_batch == 256  # auto on a CPU
    assert Image.open(wide_run / "targets" / "target_00.png").size == (80, 48)
    assert Image.open(wide_run / "generations" / "0000" / "images" / "c00_i00.png").size == (80, 48)
    _, recipe = load_pinned(wide_run)
    assert (recipe["height"], recipe["width"]) == (48, 80)
    assert main(["render", str(wide_run), "-n", "1", "-o", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "pinned_seed0.png").size == (80, 48)


def test_model_dependent_defaults_are_filled_in_by_family():
    from embedpin.config import MODEL_DEFAULTS, RunConfig

    sdxl = RunConfig().for_model("SDXL", 1024, 768, 64)
    assert (sdxl.render.steps, sdxl.render.cfg, sdxl.render.scheduler) == (25, 6.0, "dpm++2m-karras")
    assert (sdxl.render.height, sdxl.render.width, sdxl.render.max_batch) == (1024, 768, 64)
    mine = RunConfig()
    mine.render.steps, mine.render.cfg = 30, 0.0
    ours = mine.for_model("SD 1.x", 512, 512, 8)
    assert (ours.render.steps, ours.render.cfg) == (30, 0.0)  # what the user set stays
    assert set(MODEL_DEFAULTS) == {"micro", "SD 1.x", "SD 2.x", "SDXL"}


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    """A micro run at 256²: the run keeps previews, and full PNGs of the generation's best."""
    out = tmp_path_factory.mktemp("large")
    args = _optimize(out, "--size", "256")
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    (run,) = list(out.iterdir())
    return run


def test_a_large_run_keeps_previews_and_the_best_candidates_full_size(large_run):
    gen = json.loads((large_run / "generations" / "0000" / "generation.json").read_text())
    folder = large_run / "generations" / "0000"
    for c in gen["candidates"]:
        assert all(p.endswith(".webp") and Image.open(folder / p).size == (192, 192) for p in c["images"])
        if c["index"] == gen["best_candidate"]:
            assert [Image.open(folder / p).size for p in c["full"]] == [(256, 256)] * 2
        else:
            assert "full" not in c and not list(folder.glob(f"images/c{c['index']:02d}_*.png"))
    assert all(p.endswith(".webp") for p in gen["errmaps"]) and all(
        p.endswith(".webp") for v in gen["validation"] for p in v["images"])
    page = (folder / "index.html").read_text()
    best = gen["best_candidate"]
    assert f'href="images/c{best:02d}_i00.png"' in page and 'src="images/c00_i00.webp"' in page
    assert "report/thumbs" not in page  # previews are the page's thumbnails: nothing stored twice


def test_any_report_image_re_renders_at_full_size_exactly(large_run, tmp_path, capsys):
    gen = json.loads((large_run / "generations" / "0000" / "generation.json").read_text())
    best = gen["candidates"][gen["best_candidate"]]
    rel = f"generations/0000/{best['images'][1]}"
    assert main(["render", str(large_run), "--image", rel, "-o", str(tmp_path)]) == 0
    ours = np.asarray(Image.open(tmp_path / "c{:02d}_i01.png".format(best["index"])), dtype=int)
    kept = np.asarray(Image.open(large_run / "generations" / "0000" / best["full"][1]), dtype=int)
    assert ours.shape == (256, 256, 3) and np.abs(ours - kept).max() <= 2  # the hyperbatch image, replayed alone
    other = next(c for c in gen["candidates"] if c["index"] != gen["best_candidate"])

    def preview(rel):
        return np.asarray(Image.open(large_run / rel).convert("RGB"), dtype=float)

    for rel, unlike in ((f"generations/0000/{other['images'][0]}", f"generations/0000/{other['images'][1]}"),
                        (gen["validation"][0]["images"][0], "validation/plain_i00.webp")):
        assert main(["render", str(large_run), "--image", rel, "-o", str(tmp_path)]) == 0
        full = Image.open(tmp_path / f"{Path(rel).stem}.png")
        shrunk = np.asarray(full.resize((192, 192), Image.Resampling.LANCZOS), dtype=float)
        near, far = np.abs(shrunk - preview(rel)).mean(), np.abs(shrunk - preview(unlike)).mean()
        assert full.size == (256, 256) and near < far / 3  # its own preview (lossy), at full size
    capsys.readouterr()
    assert main(["render", str(large_run), "--image", "generations/0000/images/c99_i00.webp", "-o",
                 str(tmp_path)]) == 2
    assert "not an image of this run's report" in capsys.readouterr().err


def test_keep_images_all_keeps_every_png(tmp_path):
    args = _optimize(tmp_path, "--size", "256", "--keep-images", "all", "--validation-seeds", "0")
    args[args.index("--steps") + 1] = "1"
    assert main(args) == 0
    (run,) = list(tmp_path.iterdir())
    assert len(list((run / "generations" / "0000" / "images").glob("*.png"))) == 4
    assert not list(run.glob("generations/*/images/*.webp"))


def test_a_call_that_runs_out_of_memory_is_retried_at_half_the_batch():
    """The fallback of --max-batch auto: a UNet that cannot take more than 2 images per call
    (it raises the device's out-of-memory error) renders the same images as max_batch 2."""
    from dataclasses import replace

    from embedpin.guidance.encode import encode_prompt
    from embedpin.models.loader import load_components
    from embedpin.render.sampler import RenderPlan, render

    comp = load_components("micro")

    class Small(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.config, self.calls = unet, unet.config, []

        def forward(self, x, *args, **kwargs):
            self.calls.append(len(x))
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.unet(x, *args, **kwargs)

    cond = encode_prompt(comp, "a red star").hidden.expand(3, -1, -1)
    neg = encode_prompt(comp, "").hidden
    plan = RenderPlan(batch=2, steps=2, seed=1, max_batch=64, height=32, width=32)
    small = replace(comp, unet=Small(comp.unet))
    got = render(small, cond, neg, 5.0, plan)
    want = render(comp, cond, neg, 5.0, replace(plan, max_batch=2))
    torch.testing.assert_close(got.images, want.images, atol=1e-5, rtol=0)
    assert max(small.unet.calls) > 2 and small.unet.calls[-1] <= 2 and got.unet_evals == want.unet_evals


def test_in_chunks_halves_only_on_out_of_memory():
    sizes = []

    def fn(a, b):
        sizes.append(b - a)
        if b - a > 3:
            raise torch.OutOfMemoryError("out of memory")
        return list(range(a, b))

    out, size = in_chunks(fn, 10, 16)
    assert sum(out, []) == list(range(10)) and size == 2 and sizes[:3] == [10, 8, 4]
    with pytest.raises(ValueError):
        in_chunks(lambda a, b: (_ for _ in ()).throw(ValueError("a bug, not memory")), 4, 4)


@pytest.mark.parametrize("free, fixed, per, want", [
    (10 * 2**30, 2**30, 2**28, 2 * 28), (2**30, 2**30, 2**28, 2), (2**40, 0, 2**20, 256)])
def test_the_probe_sizes_the_batch_to_the_free_memory(free, fixed, per, want):
    assert batch_for_memory(free, fixed, per) == want


def test_half_precision_runs_the_models_in_it_and_keeps_guidance_and_scores_in_float32(tmp_path):
    from embedpin.api import run_config
    from embedpin.evaluation.session import Session

    def session(dtype):
        return Session.prepare(run_config(target=STAR, prompt="a star", dtype=dtype, validation_seeds=4, steps=4,
                                          out=str(tmp_path)))

    half, full = session("bfloat16"), session("float32")
    assert half.components.unet.dtype == torch.bfloat16 and half.components.text_encoder.dtype == torch.bfloat16
    assert next(half.components.clip.parameters()).dtype == torch.float32  # the image tower stays float32
    assert half.ctx.plain.hidden.dtype == torch.float32 and half.ctx.delta_basis.sequence.dtype == torch.float32
    ev = half.evaluate(np.zeros((2, half.space.n)), 0)
    assert ev.render.images.dtype == torch.float32 and ev.score.loss.dtype == torch.float32
    loss_half, loss_full = (s.render_plain_validation()[2].loss.item() for s in (half, full))
    assert abs(loss_half - loss_full) < 0.1 * loss_full  # the same images, up to bfloat16's rounding
