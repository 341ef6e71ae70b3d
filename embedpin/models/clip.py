"""CLIP encoders (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): images and texts to unit-norm embeddings. Preprocessing is CLIP's
own (shorter side resized to the model's input size, centre crop, mean/std normalisation),
done in torch, batched. Guidance (image prompts, word ranking) and scoring (the CLIP loss)
both encode through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from embedpin.errors import ConfigError
from embedpin.images import resize_crop
from embedpin.models.components import Components, ImageTower

EMBED_CHUNK = 64  # images per CLIP forward pass


def require_clip(components: Components):
    if components is None or components.clip is None:
        name = getattr(components, "name", None)
        raise ConfigError(f"model {name!r} has no CLIP image encoder; the CLIP loss needs one")
    return components.clip


def clip_pixels(tower: ImageTower, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> the tower's pixel_values [N, 3, S, S] (S = its input size)."""
    s = tower.image_size
    x = resize_crop(images.float(), (s, s))
    mean = x.new_tensor(tower.mean).view(1, 3, 1, 1)
    std = x.new_tensor(tower.std).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_image_embeds(components: Components, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> unit-norm CLIP image embeddings [N, Dp] (float32)."""
    clip = require_clip(components)
    p = next(clip.parameters())
    out = []
    for chunk in images.split(EMBED_CHUNK):
        pixels = clip_pixels(components.tower, chunk.to(p.device)).to(p.dtype)
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
