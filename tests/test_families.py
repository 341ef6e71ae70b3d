"""Every model family against diffusers' own pipelines: SD 1.x (epsilon), SD 2.x
(v-prediction, the SD 2.1 scheduler config) and SDXL, each a tiny random-weight pipeline built
from configs (``families``). embedpin's plain conditioning equals ``encode_prompt``; a plain
render from the same initial noise with the same scheduler equals the pipeline's image,
square and not."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.families import FAMILIES, SIZE, save_family

from embedpin.guidance.encode import encode_negative, encode_prompt
from embedpin.models.loader import load_components
from embedpin.render.noise import NoiseStreams
from embedpin.render.sampler import RenderPlan, plan_grid, render

PROMPT = "a large red star at the top left on a plain blue background"
# samplers whose discretisation is the diffusers scheduler's own (DDIM and PNDM here end at
# sigma 0 and warm up as k-diffusion does, so they are compared with themselves only)
AS_DIFFUSERS = ["euler", "heun", "lms", "dpm++2m", "dpm++2m-karras", "unipc"]
ALL_SAMPLERS = [*AS_DIFFUSERS, "ddim", "pndm", "euler-a", "ddpm", "dpm++sde", "dpm++sde-karras"]


def _family(name: str, tmp_path_factory):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = save_family(tmp_path_factory.mktemp("family") / "model", name)
    cls = StableDiffusionXLPipeline if name == "SDXL" else StableDiffusionPipeline
    return name, load_components(str(folder)), cls.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family name, embedpin's components, diffusers' pipeline) of one tiny model."""
    return _family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def v_prediction(tmp_path_factory):
    """The SD 2.x family's tiny model (v-prediction)."""
    return _family("SD 2.x", tmp_path_factory)


def test_the_family_is_told_from_the_folder(family):
    name, comp, _ = family
    assert comp.family == name and comp.default_size == SIZE
    assert comp.scheduler_config["prediction_type"] == ("v_prediction" if name == "SD 2.x" else "epsilon")


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_plain_conditioning_equals_diffusers_encode_prompt(family, clip_skip):
    name, comp, pipe = family
    negative = "a green circle"  # diffusers encodes negatives without the clip skip
    enc, neg = encode_prompt(comp, PROMPT, clip_skip or 0), encode_prompt(comp, negative)
    if name == "SDXL":
        want = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative,
                                  clip_skip=clip_skip)
        pairs = [(enc.hidden, want[0]), (neg.hidden, want[1]), (enc.pooled, want[2]), (neg.pooled, want[3])]
    else:
        te = pipe.text_encoder
        if not hasattr(te, "text_model"):  # diffusers 0.42 reaches through the ``.text_model`` wrapper that
            object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))  # tf 5.6 dropped
        want = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative, clip_skip=clip_skip)
        pairs = [(enc.hidden, want[0]), (neg.hidden, want[1])]
    for ours, ref in pairs:
        assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-5


def _diffusers_image(comp, pipe, name, plan: RenderPlan) -> torch.Tensor:
    """The pipeline's image from the initial noise embedpin draws for image 0 of ``plan``."""
    pipe.scheduler = comp.scheduler(plan.scheduler)
    pipe.scheduler.set_timesteps(plan.steps)
    sigma = plan_grid(comp, plan).sigmas[0]
    f = comp.vae_scale_factor
    z = NoiseStreams(plan.seed, (comp.latent_channels, plan.height // f, plan.width // f), comp.device).birth([0])
    init = float(pipe.scheduler.init_noise_sigma)  # embedpin starts at sigma z (EDM form); diffusers scales by
    latents = z * (sigma / (sigma**2 + 1) ** 0.5 if init == 1.0 else sigma / init)  # init_noise_sigma, or VP
    negative = {} if name == "SDXL" else {"negative_prompt": ""}
    return pipe(PROMPT, num_inference_steps=plan.steps, guidance_scale=5.0, height=plan.height, width=plan.width,
                latents=latents, output_type="pt", **negative).images[0]


def _ours(comp, plan: RenderPlan) -> torch.Tensor:
    enc, neg = encode_prompt(comp, PROMPT), encode_negative(comp, "")
    return render(comp, enc.hidden, neg.hidden, 5.0, plan, **({"pooled": enc.pooled, "negative_pooled": neg.pooled}
                                                              if comp.is_sdxl else {})).images[0, 0]


@pytest.mark.parametrize("height, width", [(SIZE, SIZE), (SIZE - 8, SIZE + 8)])
@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler"])
def test_a_plain_render_equals_the_diffusers_pipeline(family, sampler, height, width):
    name, comp, pipe = family
    plan = RenderPlan(batch=1, steps=6, scheduler=sampler, height=height, width=width, seed=11, hyperbatch=False)
    ours, ref = _ours(comp, plan), _diffusers_image(comp, pipe, name, plan)
    assert ours.shape == ref.shape == (3, height, width) and (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("sampler", AS_DIFFUSERS)
def test_v_prediction_renders_as_diffusers_with_every_matching_sampler(v_prediction, sampler):
    name, comp, pipe = v_prediction
    plan = RenderPlan(batch=1, steps=5, scheduler=sampler, height=SIZE, width=SIZE, seed=3, hyperbatch=False)
    assert (_ours(comp, plan) - _diffusers_image(comp, pipe, name, plan)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_v_prediction_hyperbatches_work_with_every_sampler(v_prediction, sampler):
    _, comp, _ = v_prediction
    plan = RenderPlan(batch=4, steps=4, scheduler=sampler, height=SIZE, width=SIZE - 8, seed=5)
    enc, neg = encode_prompt(comp, PROMPT), encode_negative(comp, "")
    images = render(comp, enc.hidden, neg.hidden, 5.0, plan).images[0]
    assert images.shape == (4, 3, SIZE, SIZE - 8) and torch.isfinite(images).all()
    assert min((images[i] - images[j]).abs().mean() for i in range(4) for j in range(i)) > 1e-3  # siblings differ
