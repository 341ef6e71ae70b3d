"""Image guidance on the trained micro model: more max image guidance -> renders closer to the guide.

Needs ``embedpin.models.loader.load_components("micro")`` (the trained weights); skipped
where they are not available.
"""

import numpy as np
import pytest
import torch

from embedpin.guidance import build, make_context
from embedpin.models.micro.dataset import Item, Scene, render_scene
from embedpin.render.sampler import RenderPlan, render
from embedpin.scoring.clip_loss import clip_image_embeds, clip_image_loss

SEEDS = (0, 1, 2)
LEVELS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def comps():
    from embedpin.models.loader import load_components

    try:
        return load_components("micro")
    except Exception as e:  # noqa: BLE001 - no trained model in this checkout
        pytest.skip(f"trained micro model unavailable: {e}")


@pytest.mark.xfail(strict=False, reason="not monotone on the shipped micro model: CLIP distance 1.441 / "
                   "1.440 / 0.700 at max_image 0 / 0.5 / 1 (0 and 0.5 equal within noise, so this passes or "
                   "fails by chance; 8 seeds, 5 levels: 1.447 / 1.431 / 1.432 / 1.234 / 0.736); the micro UNet "
                   "only ever saw text hidden states, and mixes past ~0.5 image tokens are off its training "
                   "distribution")
def test_raising_max_image_guidance_raises_clip_similarity_to_the_guide(comps):
    scene = Scene(items=(Item("square", "red", "large", "in the center"),), bg_colour="yellow", bg_kind="plain")
    guide = torch.from_numpy(render_scene(scene).astype(np.float32) / 255).permute(2, 0, 1)[None]
    ctx = make_context(comps, "a small blue circle at the top left on a plain white background", guide=guide)
    one = torch.ones(len(LEVELS), 1)
    cond = build(ctx, {"linear_start": one, "linear_end": one, "max_image": torch.tensor(LEVELS)[:, None]})
    target = clip_image_embeds(comps, guide)
    losses = []
    for seed in SEEDS:
        plan = RenderPlan(batch=4, steps=20, scheduler="ddim", seed=seed)
        images = render(comps, cond.prompt_embeds, cond.negative_embeds, cond.cfg, plan).images  # [λ, B, 3, H, W]
        losses.append(clip_image_loss(images.flatten(0, 1), target, comps).view(len(LEVELS), -1).mean(1))
    loss = torch.stack(losses).mean(0)  # CLIP cosine distance to the guide, per level
    assert (loss[1:] < loss[:-1]).all(), loss.tolist()
