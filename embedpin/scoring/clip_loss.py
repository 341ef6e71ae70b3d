"""CLIP losses: cosine distance between CLIP embeddings of renders and of targets
(images or a text), Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision". Preprocessing is CLIP's own (shorter side resized to
the model's input size, centre crop, mean/std normalisation), done in torch, batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from embedpin.errors import ConfigError
from embedpin.models.components import Components
from embedpin.scoring.targets import resize_crop

EMBED_CHUNK = 64  # images per CLIP forward pass


def require_clip(components: Components):
    if components is None or components.clip is None:
        name = getattr(components, "name", None)
        raise ConfigError(f"model {name!r} has no CLIP image encoder; the CLIP loss needs one")
    return components.clip


def clip_pixels(components: Components, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> CLIP pixel_values [N, 3, S, S] (S = clip_image_size)."""
    s = components.clip_image_size
    x = resize_crop(images.float(), (s, s))
    mean = x.new_tensor(components.clip_image_mean).view(1, 3, 1, 1)
    std = x.new_tensor(components.clip_image_std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_image_embeds(components: Components, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> unit-norm CLIP image embeddings [N, Dp] (float32)."""
    clip = require_clip(components)
    p = next(clip.parameters())
    out = []
    for chunk in images.split(EMBED_CHUNK):
        pixels = clip_pixels(components, chunk.to(p.device)).to(p.dtype)
        pooled = clip.vision_model(pixel_values=pixels).pooler_output
        out.append(clip.visual_projection(pooled).float())
    return F.normalize(torch.cat(out), dim=-1).to(images.device)


@torch.no_grad()
def clip_text_embeds(components: Components, texts: Sequence[str]) -> torch.Tensor:
    """texts -> unit-norm CLIP text embeddings [len(texts), Dp] (float32)."""
    clip = require_clip(components)
    p = next(clip.parameters())
    max_len = clip.config.text_config.max_position_embeddings
    tok = components.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=max_len, return_tensors="pt")
    pooled = clip.text_model(input_ids=tok.input_ids.to(p.device),
                             attention_mask=tok.attention_mask.to(p.device)).pooler_output
    return F.normalize(clip.text_projection(pooled).float(), dim=-1)


def cosine_distance(test_embeds: torch.Tensor, target_embeds: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance 1 - cos in [0, 2] of each test embedding [N, D] to a target set
    [T, D]: [N]."""
    t = F.normalize(test_embeds.float(), dim=-1)
    r = F.normalize(target_embeds.float().to(t.device), dim=-1)
    return 1 - (t @ r.T).mean(-1)


def clip_image_loss(test: torch.Tensor, target_embeds: torch.Tensor,
                    components: Components | None = None) -> torch.Tensor:
    """CLIP loss [N] of renders against target embeddings [T, D] (images' or a text's).

    ``test`` is either embeddings [N, D] or images [N, 3, H, W] in [0, 1] (then
    ``components`` embeds them)."""
    if test.dim() == 4:
        if components is None:
            raise TypeError("clip_image_loss of images needs components to embed them")
        test = clip_image_embeds(components, test)
    return cosine_distance(test, target_embeds)


def pairwise_cosine_distance(embeds: torch.Tensor) -> torch.Tensor:
    """1 - cos among embeddings [..., B, D]: [..., B, B] (zero diagonal up to rounding)."""
    e = F.normalize(embeds.float(), dim=-1)
    return (1 - e @ e.transpose(-1, -2)).clamp(min=0)
