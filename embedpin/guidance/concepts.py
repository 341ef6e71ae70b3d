"""Concept mapping: a second prompt selects which image features reach the base prompt.

FlexDiffuse's "mapping concepts": the concept prompt's tokens (e.g. "creepy tree") pick
their best-aligned image tokens; each base-prompt position then takes the image token of
its best-aligned concept token, gated by a high alignment threshold (a soft step, so the
``concept`` strength stays continuous). Applied after the other guidance, as an override.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedpin.guidance.mapping import cosine_matrix


@dataclass
class ConceptMapping:
    """direction [1, L, D] unit image tokens selected through the concepts; gate [1, L] in [0, 1)
    (0 on the header); alignment [1, L] best base-to-concept cosine."""

    direction: torch.Tensor
    gate: torch.Tensor
    alignment: torch.Tensor


def map_concepts(text: torch.Tensor, concepts: torch.Tensor, image: torch.Tensor,
                 threshold: float = 0.75, softness: float = 0.02) -> ConceptMapping:
    """text [1, L, D] base hidden states; concepts [1, C, D] concept-prompt tokens (no BOS/EOS);
    image [1, P, D] image tokens -> :class:`ConceptMapping` over the L base positions."""
    concept_to_image = cosine_matrix(concepts, image).argmax(-1)  # [1, C]
    unit = F.normalize(image, dim=-1)
    concept_dirs = unit.gather(1, concept_to_image[..., None].expand(-1, -1, unit.shape[-1]))  # [1, C, D]
    best, which = cosine_matrix(text, concepts).max(-1)  # [1, L]
    direction = concept_dirs.gather(1, which[..., None].expand(-1, -1, unit.shape[-1]))
    gate = torch.sigmoid((best - threshold) / softness)
    gate = torch.cat([gate.new_zeros(gate.shape[0], 1), gate[:, 1:]], dim=1)
    return ConceptMapping(direction=direction, gate=gate, alignment=best)


def concept_weights(mapping: ConceptMapping, strength: torch.Tensor) -> torch.Tensor:
    """Per-token weights [λ, L] = strength [λ] x gate [1, L]; negative pushes away from the image."""
    return strength[:, None] * mapping.gate
