"""The gradient stage (textual inversion on the targets, ``evaluation.inversion``) and where the
placeholders stand: reproducible, it lowers the loss it fits, a mask's ignored part does not move
it, it runs on every model family (v-prediction's target is diffusers' velocity), and a file with
its placeholders before or after the prompt encodes in diffusers exactly as embedpin built it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.families import FAMILIES, save_family

from embedpin.evaluation.inversion import (
    InversionSettings,
    alphas_cumprod,
    checkpoint_steps,
    conditioning,
    invert,
    invert_path,
    training_target,
)
from embedpin.guidance.context import GuidanceOptions, make_context
from embedpin.models.loader import load_components

PROMPT = "a star"
FEW = InversionSettings(steps=6, batch=4, lr=0.3, seed=3)


@pytest.fixture(scope="module")
def micro():
    return load_components("micro")


def _context(components, first: bool = False, n: int = 2, prompt: str = PROMPT):
    options = GuidanceOptions(n_vectors=n, init_word="red,left", placeholders_first=first)
    return make_context(components, prompt, options=options)


def _targets(seed: int = 0, n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


def _denoising_loss(ctx, vectors, targets, samples: int = 64) -> float:
    """The stage's objective on a fixed draw of (t, noise): what it should lower."""
    from embedpin.render.latents import encode

    comp = ctx.components
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        x0 = encode(comp.vae, targets).expand(samples, -1, -1, -1)
        t = torch.randint(1000, (samples,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod(comp)[t].view(-1, 1, 1, 1)
        text, _ = conditioning(ctx, vectors)
        out = comp.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text.expand(samples, -1, -1))
        return float((out.sample - noise).square().mean())


def test_inversion_is_a_function_of_its_settings(micro):
    ctx, targets = _context(micro), _targets()
    first, again = invert(ctx, targets, FEW), invert(ctx, targets, FEW)
    other = invert(ctx, targets, InversionSettings(steps=6, batch=4, lr=0.3, seed=4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, ctx.vector_init)


def test_the_kept_points_lie_on_the_fit_and_end_at_its_end(micro):
    """The points the run chooses its start among are the fit's own vectors at those steps:
    keeping more of them changes none, and the last is what ``invert`` returns."""
    ctx, targets = _context(micro), _targets()
    path = invert_path(ctx, targets, FEW, points=3)
    assert path.shape == (3, *ctx.vector_init.shape) and checkpoint_steps(6, 3) == [2, 4, 6]
    assert torch.equal(path[-1], invert(ctx, targets, FEW))
    shorter = InversionSettings(steps=4, batch=4, lr=0.3, seed=3)
    assert torch.equal(invert_path(ctx, targets, shorter)[-1], path[1])
    assert not torch.equal(path[0], path[1])


@given(steps=st.integers(0, 2000), points=st.integers(1, 50))
def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step(steps, points):
    kept = checkpoint_steps(steps, points)
    assert kept == sorted(set(kept)) and len(kept) == min(steps, points)
    assert (kept[-1] == steps and kept[0] >= 1) if steps else kept == []
    assert all(b - a <= -(-steps // points) + 1 for a, b in zip([0, *kept], kept))


def test_inversion_lowers_the_denoising_loss_on_the_targets(micro):
    from embedpin.models.micro import dataset

    scene = dataset.Scene((dataset.Item("star", "red", "large", "at the top left"),), "blue", "plain")
    target = torch.from_numpy(dataset.render_scene(scene)).permute(2, 0, 1)[None].float() / 255
    ctx = _context(micro)
    fitted = invert(ctx, target, InversionSettings(steps=40, batch=8, lr=0.3, seed=0))
    assert _denoising_loss(ctx, fitted, target) < 0.9 * _denoising_loss(ctx, ctx.vector_init, target)


def test_a_masks_ignored_part_does_not_move_the_inversion(micro):
    a, b = _targets(1), _targets(2)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    b = torch.where(mask.bool(), a, b)  # equal under the mask, different outside it
    ctx = _context(micro)
    assert torch.equal(invert(ctx, a, FEW, masks=mask), invert(ctx, b, FEW, masks=mask))
    assert not torch.equal(invert(ctx, a, FEW), invert(ctx, b, FEW))


def test_v_prediction_fits_diffusers_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 990])
    ours = training_target(noise, x0, sched.alphas_cumprod[t], "v_prediction")
    assert torch.allclose(ours, sched.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(training_target(noise, x0, sched.alphas_cumprod[t], "epsilon"), noise)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family name, embedpin's components, diffusers' pipeline) of one tiny random-weight model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = save_family(tmp_path_factory.mktemp("family") / "model", request.param)
    cls = StableDiffusionXLPipeline if request.param == "SDXL" else StableDiffusionPipeline
    return request.param, load_components(str(folder)), cls.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize("first", [False, True], ids=["after", "before"])
def test_inversion_runs_and_its_file_encodes_in_diffusers_as_embedpin_built_it(family, first):
    """On every family: the stage moves the vectors; the textual-inversion file of the result,
    loaded into diffusers' own pipeline and used with the usage prompt (placeholders after or
    before the words), gives the conditioning embedpin validated."""
    from embedpin.exports import usage_prompt
    from embedpin.models.embeddings import to_file_layout

    name, comp, pipe = family
    prompt = "a large red star"
    ctx = _context(comp, first, prompt=prompt)
    targets = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vectors = invert(ctx, targets, InversionSettings(steps=2, batch=2, lr=0.3))
    assert torch.isfinite(vectors).all() and not torch.equal(vectors, ctx.vector_init)
    with torch.no_grad():
        ours, pooled = conditioning(ctx, vectors)
    file = to_file_layout(vectors, [te.get_input_embeddings().embedding_dim for te in comp.text_encoders], name)
    usage = usage_prompt({"prompt": prompt, "placement": "before" if first else "after"}, "<pinned>")
    if name == "SDXL":
        pipe.load_textual_inversion(file["clip_l"], token="<pinned>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(file["clip_g"], token="<pinned>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        theirs, _, their_pooled, _ = pipe.encode_prompt(usage, device="cpu", do_classifier_free_guidance=False)
        assert (their_pooled - pooled).abs().max().item() <= 1e-4
    else:
        pipe.load_textual_inversion(file["emb_params"], token="<pinned>")
        theirs, _ = pipe.encode_prompt(usage, "cpu", 1, False)
    try:
        assert (theirs - ours).abs().max().item() <= 1e-4
    finally:
        pipe.unload_textual_inversion()
        if name == "SDXL":
            pipe.unload_textual_inversion(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


def test_placeholders_before_the_prompt_change_its_words_and_after_it_do_not(micro):
    """CLIP's text encoder is causal: vectors after the words leave the words' states as they
    are; before them, they move every word's state."""
    before, after = _context(micro, first=True), _context(micro, first=False)
    moved = before.vector_init + torch.randn(before.vector_init.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        words = after.plain.positions[:-2]
        a0, a1 = conditioning(after, after.vector_init)[0], conditioning(after, moved)[0]
        assert torch.equal(a0[:, words], a1[:, words])
        words = before.plain.positions[:-2]
        b0, b1 = conditioning(before, before.vector_init)[0], conditioning(before, moved)[0]
        assert (b0[:, words] - b1[:, words]).abs().amax(-1).min() > 1e-3
    assert before.plain.placeholders.tolist() == [1, 2] and after.plain.placeholders.tolist()[0] > 2
