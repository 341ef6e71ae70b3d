"""Foundation: tokenizer, procedural dataset, model loading and its errors, smoke training."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from embedpin.errors import ModelError
from embedpin.guidance.encode import encode_prompt
from embedpin.models import loader
from embedpin.models.loader import load_components
from embedpin.models.micro import dataset
from embedpin.models.micro.tokenizer import build_vocab, save_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(dataset.vocabulary(), tmp_path_factory.mktemp("tok"))


def test_every_caption_word_is_one_token(tok):
    for w in dataset.vocabulary():
        assert len(tok.tokenize(w)) == 1, w


def test_unknown_words_degrade_to_pieces(tok):
    pieces = tok.tokenize("a xyzzy, oil painting!")
    assert pieces[0] == "a</w>"
    assert "".join(pieces).replace("</w>", "") == "axyzzy,oilpainting!"
    assert tok.unk_token_id not in tok.convert_tokens_to_ids(pieces)


def test_clip_format_77_positions_with_header(tok):
    ids = tok("a small red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert ids[5] == tok.eos_token_id and ids[-1] == tok.pad_token_id


def test_vocab_is_deterministic():
    assert build_vocab(dataset.vocabulary()) == build_vocab(dataset.vocabulary())


def test_dataset_is_reproducible_and_captioned():
    a = dataset.batch(np.random.default_rng(5), 6)
    b = dataset.batch(np.random.default_rng(5), 6)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (6, 3, 64, 64) and a[0].min() >= 0 and a[0].max() <= 1
    assert all(c.startswith("a ") and c.endswith("background") for c in a[1])


def test_dataset_covers_the_promised_variety():
    rng = np.random.default_rng(0)
    scenes = [dataset.random_scene(rng, p_two=0.5, held_out=None) for _ in range(3000)]
    items = [i for s in scenes for i in s.items]
    assert len({i.shape for i in items}) >= 5 and len({i.colour for i in items}) >= 8
    assert len({i.size for i in items}) == 2 and len({i.position for i in items}) >= 4
    assert {s.bg_kind for s in scenes} == {"plain", "gradient", "striped"}
    assert any(len(s.items) == 2 for s in scenes)
    held = [dataset.is_held_out(s) for s in scenes if len(s.items) == 1]
    assert 0.05 < np.mean(held) < 0.15


def test_foreground_colour_check_reads_rendered_scenes():
    rng = np.random.default_rng(1)
    for _ in range(40):
        s = dataset.random_scene(rng, p_two=0)
        assert dataset.foreground_colour(dataset.render_scene(s), s.items[0], s.jitter) == s.items[0].colour


def test_silhouette_shape_check_reads_rendered_scenes_and_catches_a_wrong_shape():
    rng = np.random.default_rng(2)
    scenes = [dataset.random_scene(rng, p_two=0) for _ in range(30)]
    assert {s.items[0].shape for s in scenes} == set(dataset.SHAPES)
    for s in scenes:
        assert dataset.shape_by_template(dataset.render_scene(s), s) == s.items[0].shape
    s = scenes[0]
    wrong = next(k for k in dataset.SHAPES if k != s.items[0].shape)
    drawn = dataset.render_scene(dataclasses.replace(s, items=(dataclasses.replace(s.items[0], shape=wrong),)))
    assert dataset.shape_by_template(drawn, s) == wrong


@pytest.mark.parametrize("spec, words", [
    ("/definitely/not/here", "no such model"),
    ("model.ckpt", "pickle checkpoints are refused"),
    ("weights.bin", "pickle checkpoints are refused"),
    ("nobody-has/this-model-xyz", "not in the local Hugging Face cache"),
])
def test_bad_model_arguments(spec, words):
    with pytest.raises(ModelError, match=words):
        loader.load_components(spec)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        loader.load_components(str(tmp_path))


def test_non_safetensors_file_is_refused(tmp_path):
    f = tmp_path / "model.txt"
    f.write_text("hello")
    with pytest.raises(ModelError, match="not a model"):
        loader.load_components(str(f))


def test_micro_loads_with_every_component():
    comp = loader.load_components("micro")
    assert comp.default_size == 64 and comp.vae_scale_factor == 4 and comp.text_dim == 64
    assert comp.clip is not None and comp.clip.config.projection_dim == comp.text_dim
    assert comp.tower.image_size == 64
    assert not any(p.requires_grad for p in comp.unet.parameters())


def test_micro_loads_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(loader.MICRO_DIR), local_files_only=True)
    out = pipe("a large red circle in the center on a plain blue background", num_inference_steps=4,
               height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_micro_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in loader.MICRO_DIR.rglob("*.safetensors"))
    assert total <= 25_000_000  # decimal MB, the stricter reading


def test_micro_clip_text_tower_is_stored_once_and_is_the_text_encoder():
    from safetensors import safe_open

    with safe_open(str(loader.MICRO_DIR / "clip" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text_model.") for k in f.keys())
    comp = loader.load_components("micro")
    ids = comp.tokenizer(["a small red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want = comp.text_encoder(ids).last_hidden_state
        assert torch.equal(comp.clip.text_model(ids).last_hidden_state, want)


def test_smoke_training_and_corrupt_weights(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "embedpin.models.micro.train", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((out / "train_info.json").read_text())
    assert info["smoke"] is True
    comp = loader.load_components(str(out))
    assert comp.clip is not None and comp.unet.config.cross_attention_dim == comp.text_dim
    assert loader._shares_text_tower(out / "clip")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not really weights")
    with pytest.raises(ModelError, match="cannot load the UNet"):
        loader.load_components(str(broken))


def test_clip_hard_negatives_change_one_attribute():
    from embedpin.models.micro import dataset
    from embedpin.models.micro.train import hard_negatives

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = dataset.random_scene(rng, p_two=0.5)
        negs = hard_negatives(scene, rng)
        assert len(negs) == len(dataset.SHAPES) - 1 + 3 and scene.caption not in negs and len(set(negs)) == len(negs)
        words = scene.caption.split()
        for neg in negs[:len(dataset.SHAPES) - 1]:  # the shape swaps: one word differs, and it is a shape
            diff = [(a, b) for a, b in zip(words, neg.split()) if a != b]
            assert len(diff) == 1 and diff[0][1] in dataset.SHAPES


def test_image_variation_training_conditions_as_image_guidance_does_at_run_time():
    """The UNet's last training phase conditions on a caption guided toward its own image; that
    conditioning must be the one ``guidance.build`` makes for a flat tween weight w (else the
    UNet learns a guidance that embedpin never applies)."""
    from embedpin.guidance import build, encode_image, make_context
    from embedpin.guidance.encode import image_tokens
    from embedpin.models.micro.arch import random_components
    from embedpin.models.micro.train import image_conditioning

    comps = random_components(scale=0.25)
    imgs, caps, _ = dataset.batch(np.random.default_rng(3), 1)
    guide = torch.from_numpy(np.ascontiguousarray(imgs))
    ctx = make_context(comps, caps[0], guide=guide)
    w = torch.tensor([0.0, 0.3, 0.8, 1.0])
    ref = build(ctx, {"linear_start": w[:, None], "linear_end": w[:, None]}).prompt_embeds
    tokens = image_tokens(comps.clip, (guide - 0.5) / 0.5)  # as train._encode_dataset makes them
    assert torch.equal(tokens, encode_image(comps, guide))
    got = image_conditioning(ctx.plain.hidden.expand(4, -1, -1), tokens.expand(4, -1, -1), w)
    assert torch.equal(got[0], ctx.plain.hidden[0])  # w = 0: the caption's own conditioning
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert not torch.allclose(got[3], got[1], atol=1e-3)


def test_a_single_file_sd1_checkpoint_runs_like_its_folder(tmp_path):
    """micro written as an original-layout checkpoint (``cond_stage_model.transformer``,
    ``model.diffusion_model``, ``first_stage_model``) loads through ``--model-config`` to the
    same weights, so it renders the same images."""
    from diffusers import StableDiffusionPipeline
    from support.ldm_checkpoint import save_single_file

    from embedpin.models.checkpoint import read_weights
    from embedpin.models.loader import MICRO_DIR
    from embedpin.render.sampler import RenderPlan, render

    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    ckpt = save_single_file(pipe, tmp_path / "micro.safetensors")
    assert read_weights(ckpt).family == "SD 1.x"
    ours, ref = load_components(str(ckpt), model_config=str(MICRO_DIR)), load_components("micro")
    assert ours.family == "SD 1.x" and ours.clip is None  # image towers come from --clip for single files
    plan = RenderPlan(batch=2, steps=4, height=64, width=64, seed=5)
    cond = encode_prompt(ours, "a red star").hidden
    assert torch.equal(cond, encode_prompt(ref, "a red star").hidden)
    neg = encode_prompt(ours, "").hidden
    assert torch.equal(render(ours, cond, neg, 5.0, plan).images, render(ref, cond, neg, 5.0, plan).images)
