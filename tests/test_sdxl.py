"""SDXL: both encoders, pooled embeddings and size ids, image towers, textual inversion and
single files (a tiny random-weight SDXL built from configs, ``sdxl_model``; its conditioning
and renders against diffusers' pipeline: ``test_families``)."""

from __future__ import annotations

import pytest
import torch
from support.sdxl_model import SIZE, W1, W2, save_sdxl_folder, save_tower

from embedpin.config import SearchConfig
from embedpin.errors import ConfigError
from embedpin.guidance.encode import encode_negative, encode_prompt
from embedpin.models.loader import load_components
from embedpin.render.sampler import RenderPlan, render
from embedpin.store import load_run

N_VECTORS = SearchConfig().n_vectors  # the default (an exported run's file has as many)

PROMPT = "a large red star at the top left on a plain blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def comp(folder):
    return load_components(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)


def test_sdxl_folder_loads_as_the_sdxl_family(comp):
    assert comp.is_sdxl and comp.family == "SDXL" and comp.zero_empty_negative
    assert comp.text_dim == W1 + W2 == comp.unet.config.cross_attention_dim


def test_an_empty_negative_is_zeros_when_the_pipeline_says_so(comp, pipe):
    want = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=None)
    neg = encode_negative(comp, "")
    assert torch.equal(neg.hidden, want[1]) and torch.equal(neg.pooled, want[3]) and not neg.hidden.any()
    assert encode_negative(comp, "a green circle").hidden.abs().sum() > 0


def test_hyperbatch_renders_of_candidates_with_their_own_pooled_embeddings(comp):
    plan = RenderPlan(batch=4, steps=4, scheduler="dpm++2m", height=SIZE, width=SIZE, seed=3)
    enc, neg = encode_prompt(comp, PROMPT), encode_negative(comp, "")
    cond = enc.hidden.expand(3, -1, -1)
    pooled = torch.cat([enc.pooled, enc.pooled, enc.pooled * 3])
    out = render(comp, cond, neg.hidden, 5.0, plan, pooled=pooled, negative_pooled=neg.pooled).images
    assert out.shape == (3, 4, 3, SIZE, SIZE) and torch.isfinite(out).all()
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])  # the pooled vector is used per candidate


def test_an_sdxl_render_without_pooled_embeddings_is_refused(comp):
    enc = encode_prompt(comp, PROMPT)
    plan = RenderPlan(batch=1, steps=2, height=SIZE, width=SIZE, hyperbatch=False)
    with pytest.raises(ConfigError, match="pooled"):
        render(comp, enc.hidden, enc.hidden, 5.0, plan)


@pytest.fixture(scope="module")
def sdxl_run(folder, tmp_path_factory):
    """A short run on the tiny SDXL: token vectors (one per encoder) and token weights."""
    from pathlib import Path

    from embedpin.cli import main

    out = tmp_path_factory.mktemp("runs")
    star = Path(__file__).resolve().parents[1] / "examples" / "star.png"
    args = ["optimize", "--model", str(folder), "--target", str(star), "--prompt", "a star", "--out", str(out),
            "--blocks", "token_vectors,token_weights", "--init-word", "circle", "--inversion-steps", "2", "--generations", "2",
            "--population", "4", "--batch", "2", "--steps", "3", "--size", str(SIZE), "--validation-seeds", "0",
            "--rank", "4", "--quiet"]
    assert main(args) == 0
    (run,) = list(out.iterdir())
    return run


def test_an_sdxl_run_pins_both_encoders_vectors_and_the_pooled_embedding(sdxl_run, comp):
    from embedpin.exports import load_pinned

    tensors, recipe = load_pinned(sdxl_run)
    assert recipe["family"] == "SDXL" and recipe["widths"] == [W1, W2]
    assert tensors["prompt_embeds"].shape == (1, 77, W1 + W2) and tensors["pooled_prompt_embeds"].shape == (1, W2)
    assert tensors["token_vectors"].shape == (N_VECTORS, W1 + W2)
    assert not tensors["negative_prompt_embeds"].any() and not tensors["negative_pooled_prompt_embeds"].any()
    plain = encode_prompt(comp, "a star")
    assert not torch.allclose(tensors["pooled_prompt_embeds"], plain.pooled)  # the vectors moved the pooled vector


def test_sdxl_textual_inversion_loads_in_diffusers_with_two_calls(sdxl_run, pipe, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from embedpin.cli import main
    from embedpin.evaluation.session import Session
    from embedpin.guidance.build import build

    ti = tmp_path / "pinned.safetensors"
    assert main(["export", str(sdxl_run), "--format", "textual-inversion", "-o", str(ti)]) == 0
    state = load_file(str(ti))
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (N_VECTORS, W1) and state["clip_g"].shape == (N_VECTORS, W2)
    with safe_open(str(ti), framework="pt") as f:
        meta = json.loads(f.metadata()["embedpin"])
    pipe.load_textual_inversion(state["clip_l"], token="<pinned>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<pinned>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    emb, _, pooled, _ = pipe.encode_prompt(meta["usage"], device="cpu", do_classifier_free_guidance=False)
    s = Session.of_run(load_run(sdxl_run))
    vectors = torch.tensor([meta["params"]["token_vectors"]]).to(s.ctx.plain.hidden)
    only_vectors = build(s.ctx, {"token_vectors": vectors})
    assert (emb - only_vectors.prompt_embeds).abs().max().item() <= 1e-4
    assert (pooled - only_vectors.pooled_embeds).abs().max().item() <= 1e-4


def test_sdxl_diffusers_export_drives_the_sdxl_pipeline_and_embedpin_render(sdxl_run, pipe, tmp_path):
    from safetensors.torch import load_file

    from embedpin.cli import main

    f = tmp_path / "embeds.safetensors"
    assert main(["export", str(sdxl_run), "--format", "diffusers", "-o", str(f)]) == 0
    t = load_file(str(f))
    assert set(t) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    img = pipe(**t, num_inference_steps=3, height=SIZE, width=SIZE, output_type="np").images
    assert img.shape == (1, SIZE, SIZE, 3)
    assert main(["render", str(sdxl_run), "--seed", "3", "-n", "1", "-o", str(tmp_path / "o")]) == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["pinned_seed3.png"]


def test_models_command_names_the_family_size_prediction_and_towers(folder, capsys):
    from embedpin.cli import main

    assert main(["models", "--model", str(folder)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"SDXL, native {SIZE}px, epsilon prediction, text {W1} + {W2} (pooled {W2})" in line
    assert "image towers: none" in line
    assert main(["models", "--model", "micro"]) == 0
    assert "SD 1.x, native 64px" in capsys.readouterr().out


@pytest.mark.parametrize("prefix, missing", [
    ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", "conditioner.embedders.0.transformer"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias", "cond_stage_model.model"),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "cond_stage_model.transformer"),
])
def test_a_single_file_with_a_family_key_but_no_model_is_one_error_line(tmp_path, prefix, missing, capsys):
    from safetensors.torch import save_file

    from embedpin.cli import main

    ckpt = tmp_path / "model.safetensors"
    save_file({prefix: torch.zeros(1), "model.diffusion_model.out.0.bias": torch.zeros(1)}, str(ckpt))
    assert main(["models", "--model", str(ckpt)]) == 2  # nothing cached here, and nothing is downloaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"its text encoder under {missing} has no token embedding" in err[0]


def test_a_single_file_that_is_no_known_checkpoint_is_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    from embedpin.cli import main

    ckpt = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(1)}, str(ckpt))
    assert main(["models", "--model", str(ckpt)]) == 2
    assert "not a Stable Diffusion checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def towered_folder(tmp_path_factory):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-clip", tower=W1)


@pytest.fixture(scope="module")
def towered(towered_folder):
    return load_components(str(towered_folder))


def test_sdxl_image_guidance_acts_on_the_part_its_tower_matches(towered):
    from embedpin.guidance.build import build
    from embedpin.guidance.context import GuidanceOptions, make_context

    guide = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ctx = make_context(towered, PROMPT, guide=guide, options=GuidanceOptions(delta_basis="image", delta_k=4))
    assert [g.part for g in ctx.guided] == [slice(0, W1)] and "first text encoder's part" in ctx.guidance_note
    plain = ctx.plain.hidden
    guided = build(ctx, {"linear_start": torch.tensor([[0.8]]), "linear_end": torch.tensor([[0.8]])})
    moved = (guided.prompt_embeds - plain).abs()
    assert moved[..., :W1].max() > 1e-3 and moved[..., W1:].max() == 0  # the second encoder's part is untouched
    assert torch.equal(guided.pooled_embeds, ctx.plain.pooled.expand(1, -1))
    seq = ctx.delta_basis.sequence
    assert seq[..., W1:].abs().max() == 0 and seq[..., :W1].abs().max() > 0


def test_a_tower_that_matches_no_sdxl_encoder_is_refused(towered):
    from dataclasses import replace

    from transformers import CLIPConfig, CLIPModel

    from embedpin.errors import ModelError
    from embedpin.guidance.context import make_context
    from embedpin.models.components import ImageTower

    c = towered.clip.config
    other = CLIPModel(CLIPConfig(text_config=c.text_config.to_dict(), vision_config=c.vision_config.to_dict(),
                                 projection_dim=W1 + 8)).eval()
    with pytest.raises(ModelError, match="matches neither SDXL text encoder"):
        make_context(replace(towered, towers=(ImageTower(other, SIZE),)), PROMPT, guide=torch.rand(1, 3, SIZE, SIZE))


def test_a_default_sdxl_run_with_one_tower_guides_its_part_and_says_so(towered_folder, tmp_path, capsys):
    import json
    from pathlib import Path

    from embedpin.cli import main

    star = Path(__file__).resolve().parents[1] / "examples" / "star.png"
    args = ["optimize", "--model", str(towered_folder), "--target", str(star), "--prompt", "a star", "--out",
            str(tmp_path), "--inversion-steps", "2", "--generations", "1", "--population", "4", "--batch", "2", "--steps", "3",
            "--validation-seeds", "2", "--rank", "4", "--blocks", "guidance,token_vectors,token_weights"]
    assert main(args) == 0
    assert "note: image guidance acts on the first text encoder's part" in capsys.readouterr().err
    (run,) = list(tmp_path.iterdir())
    state = json.loads((run / "state.json").read_text())
    assert state["notes"] and f"({W1} of {W1 + W2} features)" in state["notes"][0]
    page = (run / "index.html").read_text().replace("&#39;", "'")
    assert "image guidance acts on the first text encoder's part" in page
    searched = {b["name"] for b in state["space"]["blocks"]}
    assert {"linear_start", "token_vectors", "token_weights"} <= searched


@pytest.fixture(scope="module")
def single_file(folder, tmp_path_factory):
    """The tiny SDXL as an original-layout single-file checkpoint (what A1111 users have)."""
    from diffusers import StableDiffusionXLPipeline
    from support.ldm_checkpoint import save_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)  # (not the shared one)
    return save_single_file(pipe, tmp_path_factory.mktemp("ckpt") / "tiny-sdxl.safetensors")


def test_a_single_file_sdxl_checkpoint_loads_as_its_folder_does(single_file, folder, comp, capsys):
    from embedpin.cli import main

    loaded = load_components(str(single_file), model_config=str(folder))
    assert loaded.family == "SDXL" and loaded.zero_empty_negative
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, ref = getattr(loaded, name).state_dict(), getattr(comp, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    enc, ref = encode_prompt(loaded, PROMPT), encode_prompt(comp, PROMPT)
    # (the same weights; the loaders may pick other attention kernels: float rounding only)
    assert (enc.hidden - ref.hidden).abs().max() <= 1e-5 and (enc.pooled - ref.pooled).abs().max() <= 1e-5
    assert main(["models", "--model", str(single_file), "--model-config", str(folder)]) == 0
    assert f"SDXL, native {SIZE}px" in capsys.readouterr().out


def test_a_single_file_with_a_config_of_another_family_is_one_error_line(single_file, capsys):
    from embedpin.cli import main
    from embedpin.models.loader import MICRO_DIR

    assert main(["models", "--model", str(single_file), "--model-config", str(MICRO_DIR)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "SDXL" in err[0]


@pytest.fixture(scope="module")
def two_towers(towered_folder):
    """The tiny SDXL with a ViT-L-like tower (W1) and a bigG-like one (W2), given as two --clip."""
    second = save_tower(towered_folder.parent / "clip-g", W2, seed=5)
    return load_components(str(towered_folder), clip=[str(towered_folder / "clip"), str(second)])


def test_two_towers_guide_both_encoders_parts(two_towers, towered_folder, capsys):
    from embedpin.cli import main
    from embedpin.guidance.build import build
    from embedpin.guidance.context import make_context

    guide = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ctx = make_context(two_towers, PROMPT, guide=guide)
    assert [g.part for g in ctx.guided] == [slice(0, W1), slice(W1, W1 + W2)] and ctx.guidance_note is None
    guided = build(ctx, {"linear_start": torch.tensor([[0.8]]), "linear_end": torch.tensor([[0.8]])})
    moved = (guided.prompt_embeds - ctx.plain.hidden).abs()
    assert moved[..., :W1].max() > 1e-3 and moved[..., W1:].max() > 1e-3
    one = make_context(load_components(str(towered_folder)), PROMPT, guide=guide)
    assert torch.equal(ctx.guided[0].mapping.index, one.guided[0].mapping.index)  # the first tower's part as alone
    assert main(["models", "--model", str(towered_folder), "--clip", str(towered_folder / "clip"), "--clip",
                 str(towered_folder.parent / "clip-g")]) == 0
    out = capsys.readouterr().out
    assert f"projection {W1} -> encoder 1" in out and f"projection {W2} -> encoder 2" in out


def test_two_towers_on_the_same_encoder_are_refused(towered_folder):
    from embedpin.guidance.context import make_context

    same = load_components(str(towered_folder), clip=[str(towered_folder / "clip")] * 2)
    with pytest.raises(ConfigError, match="same text features"):
        make_context(same, PROMPT, guide=torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("kind", ["image", "pca", "random"])
def test_the_sdxl_delta_moves_the_pooled_vector_by_exactly_its_coefficients(two_towers, kind):
    from embedpin.guidance.build import build, distance
    from embedpin.guidance.context import GuidanceOptions, make_context

    guide = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ctx = make_context(two_towers, PROMPT, guide=guide, options=GuidanceOptions(delta_basis=kind, delta_k=4))
    c = torch.tensor([[0.1, 0.0, -0.2, 0.0], [0.0, 0.3, 0.0, 0.4]])
    cond = build(ctx, {"delta": c})
    torch.testing.assert_close(distance(ctx, cond), c.norm(dim=1), atol=1e-5, rtol=1e-4)
    assert (cond.pooled_embeds - ctx.plain.pooled).abs().max() > 1e-4  # the delta covers the pooled vector too
    basis = ctx.delta_basis
    joint = torch.cat([basis.sequence.flatten(1), basis.pooled], 1)
    joint = joint / joint[0].norm()
    torch.testing.assert_close(joint @ joint.T, torch.eye(4), atol=1e-5, rtol=0)  # orthogonal, equal norms


def test_an_embedding_or_a_pinned_result_of_another_family_is_one_error_line(sdxl_run, folder, tmp_path, capsys):
    from pathlib import Path

    from safetensors.torch import save_file

    from embedpin.cli import main

    star = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
    sdxl_ti, sd1_ti = tmp_path / "sdxl.safetensors", tmp_path / "sd1.safetensors"
    assert main(["export", str(sdxl_run), "--format", "textual-inversion", "-o", str(sdxl_ti)]) == 0
    save_file({"emb_params": torch.zeros(2, 64)}, str(sd1_ti))
    capsys.readouterr()
    cases = [
        (["optimize", "--model", "micro", "--init-embedding", str(sdxl_ti)], "is an SDXL embedding"),
        (["optimize", "--model", str(folder), "--init-embedding", str(sd1_ti)], "is an SD 1.x / 2.x embedding"),
        (["render", str(sdxl_run), "--model", "micro", "-n", "1", "-o", str(tmp_path / "o")], "this pinned result is SDXL"),
    ]
    for args, says in cases:
        if args[0] == "optimize":
            args += ["--target", star, "--prompt", "a star", "--out", str(tmp_path / "runs"), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no half-written run


def test_an_sdxl_embedding_starts_an_sdxl_run_at_its_vectors(sdxl_run, folder, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from embedpin.api import run_config
    from embedpin.cli import main
    from embedpin.evaluation.session import Session

    ti = tmp_path / "start.safetensors"
    assert main(["export", str(sdxl_run), "--format", "textual-inversion", "-o", str(ti)]) == 0
    star = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
    s = Session.prepare(run_config(model=str(folder), target=star, prompt="a star", init_embedding=str(ti),
                                   blocks="token_weights", size=SIZE, out=str(tmp_path / "runs")))
    state = load_file(str(ti))
    assert torch.equal(s.ctx.vector_init, torch.cat([state["clip_l"], state["clip_g"]], -1))
    assert s.ctx.options.n_vectors == N_VECTORS and [b.name for b in s.space.blocks] == ["token_weights"]


def test_without_an_image_tower_the_default_run_goes_on_and_an_explicit_guide_is_refused(folder, tmp_path, capsys):
    from pathlib import Path

    from embedpin.cli import main

    star = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
    base = ["optimize", "--model", str(folder), "--target", star, "--prompt", "a star", "--out", str(tmp_path),
            "--inversion-steps", "2",
            "--generations", "1", "--population", "4", "--batch", "2", "--steps", "2", "--validation-seeds", "0",
            "--rank", "4", "--quiet"]
    assert main(base[:-1]) == 0  # the default blocks read no guide image: nothing to say
    assert "no image CLIP tower" not in capsys.readouterr().err
    assert main([*base[:-1], "--blocks", "guidance,token_vectors"]) == 0  # guidance has nothing to act with: said
    assert "note: no image CLIP tower for this model" in capsys.readouterr().err
    assert main([*base, "--guide", star]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CLIP image encoder" in err[0] and "--clip" in err[0]
