"""CLIP losses: cosine distance between CLIP embeddings of renders and of targets
(images or a text), Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; the encoders are :mod:`embedpin.models.clip`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedpin.models.clip import clip_image_embeds
from embedpin.models.components import Components


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
