"""Image guidance on the trained micro model: more max image guidance -> renders closer to the guide.

Needs ``embedpin.models.loader.load_components("micro")`` (the trained weights); skipped
where it is not available. Renders with a plain DDIM + CFG loop on the components and
measures CLIP image-image cosine with the model's own CLIP, so it depends on no other stage.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedpin.guidance import GuidanceOptions, build, make_context
from embedpin.guidance.encode import clip_preprocess
from embedpin.models.micro.dataset import SHAPES, Item, Scene, render_scene

SEEDS = (0, 1, 2, 3)
LEVELS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def comps():
    loader = pytest.importorskip("embedpin.models.loader")
    try:
        return loader.load_components("micro")
    except Exception as e:  # noqa: BLE001 - no trained model in this checkout
        pytest.skip(f"trained micro model unavailable: {e}")


@torch.no_grad()
def _render(comps, cond, seeds, steps=20) -> torch.Tensor:
    """[λ, len(seeds), 3, H, W] in [0, 1]: DDIM with classifier-free guidance."""
    lam, k = cond.prompt_embeds.shape[0], len(seeds)
    size = comps.unet.config.sample_size
    latents = torch.cat([torch.randn(1, comps.latent_channels, size, size, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).repeat(lam, 1, 1, 1)
    text = torch.cat([cond.prompt_embeds.repeat_interleave(k, 0), cond.negative_embeds.expand(lam * k, -1, -1)])
    cfg = cond.cfg.repeat_interleave(k)[:, None, None, None]
    sched = comps.scheduler("ddim")
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        eps = comps.unet(torch.cat([latents, latents]), t, encoder_hidden_states=text).sample
        c, u = eps.chunk(2)
        latents = sched.step(u + cfg * (c - u), t, latents).prev_sample
    images = comps.vae.decode(latents / comps.vae.config.scaling_factor).sample
    return ((images + 1) / 2).clamp(0, 1).view(lam, k, *images.shape[1:])


@torch.no_grad()
def _clip_similarity(comps, images: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Cosine of CLIP image embeddings: images [N, 3, H, W] vs guide [1, 3, H, W] -> [N]."""
    emb = comps.clip.get_image_features(pixel_values=clip_preprocess(comps, torch.cat([images, guide]))).pooler_output
    emb = F.normalize(emb, dim=-1)
    return emb[:-1] @ emb[-1]


def test_raising_max_image_guidance_raises_clip_similarity_to_the_guide(comps):
    scene = Scene(items=(Item(SHAPES[1], "red", "large", "in the center"),), bg_colour="yellow", bg_kind="plain")
    guide = torch.from_numpy(render_scene(scene).astype(np.float32) / 255).permute(2, 0, 1)[None]
    ctx = make_context(comps, "a small blue circle at the top left on a plain white background", guide=guide,
                       options=GuidanceOptions(cfg=5.0))
    lam = len(LEVELS)
    one = torch.ones(lam, 1)
    cond = build(ctx, {"linear_start": one, "linear_end": one, "max_image": torch.tensor(LEVELS)[:, None]})
    renders = _render(comps, cond, SEEDS)
    sim = _clip_similarity(comps, renders.flatten(0, 1), guide).view(lam, len(SEEDS)).mean(1)
    assert (sim[1:] > sim[:-1]).all(), sim.tolist()
