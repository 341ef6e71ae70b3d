"""FlexDiffuse image guidance: tween every text token toward its mapped image token."""

from __future__ import annotations

import torch

from embedpin.config import FLEX_BLOCKS
from embedpin.guidance.mapping import Mapping
from embedpin.guidance.tween import tween, tween_weights

FLEX_PARAMS = FLEX_BLOCKS


def image_guidance(text: torch.Tensor, mapping: Mapping, profile: torch.Tensor,
                   params: dict[str, torch.Tensor], softness: float = 0.02, window: int | None = None) -> torch.Tensor:
    """text [λ|1, L, D] -> guided [λ, L, D]: text + w (mapped - text), w from :func:`tween_weights`.

    ``mapping`` holds the image tokens mapped onto the plain prompt, rescaled here to the
    norms of ``text`` (which may differ per candidate); ``params`` values are [λ]; a prompt in
    chunks of ``window`` positions is weighted chunk by chunk.
    """
    w = tween_weights(mapping.alignment, profile, mapping.valid, params, softness, window)
    return tween(text, mapping.tokens(text), w)
