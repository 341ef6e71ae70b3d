"""Map CLIP image tokens onto the text tokens of a prompt (FlexDiffuse's best-fit mapping).

Every text position gets one image token and the cosine alignment between them. The
header (BOS, position 0) takes part in no assignment: it is paired with the image's CLS
token (index 0, the global image embedding) and never uses up an image token.

Modes:
- ``alignment-first``: greedy assignment in decreasing alignment over all (text, image)
  pairs ("optimal fit" in FlexDiffuse);
- ``text-order-first``: text positions in order, each takes its best remaining image token;
- ``direct``: image tokens laid over the sequence in their own order (position i <- token i).

With ``reuse`` an image token may serve several text positions (so the two greedy modes
coincide: each position takes its best token, and ``direct`` wraps around); without it,
positions left over when image tokens run out are unmapped (``valid`` False, alignment 0).

Mapped tokens are rescaled to the norm of the text token they replace: CLIP's projected
image tokens and the text encoder's layer-normed outputs have different scales, and
tweening between vectors of equal norm moves direction, not magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedpin.errors import ConfigError

MODES = ("alignment-first", "text-order-first", "direct")


@dataclass
class Mapping:
    """index [B, L] long (-1 = unmapped), alignment [B, L] cosine in [-1, 1] (0 where unmapped),
    direction [B, L, D] unit vectors of the mapped image tokens (zero where unmapped),
    valid [B, L] bool."""

    index: torch.Tensor
    alignment: torch.Tensor
    direction: torch.Tensor
    valid: torch.Tensor

    def tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Mapped image tokens rescaled to ``text``'s per-token norms [.., L, D]; ``text`` where unmapped."""
        scaled = self.direction * text.norm(dim=-1, keepdim=True)
        return torch.where(self.valid[..., None], scaled, text)


def cosine_matrix(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every text token with every image token: [B, L, D] x [B, P, D] -> [B, L, P]."""
    return F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).transpose(-1, -2)


def _best(sim: torch.Tensor) -> torch.Tensor:
    """Each position's best image token (reuse allowed): [B, L, P] -> [B, L]."""
    return sim.argmax(-1)


def _greedy_alignment_first(sim: torch.Tensor) -> torch.Tensor:
    """Greedy one-to-one assignment in decreasing alignment: [B, L, P] -> index [B, L] (-1 unmapped).

    Sequential by nature (each pick removes a row and a column), so min(L, P) steps of
    batched argmax; run once per guidance context.
    """
    b, n, p = sim.shape
    index = sim.new_full((b, n), -1, dtype=torch.long)
    s = sim.clone()
    rows = torch.arange(b, device=sim.device)
    for _ in range(min(n, p)):
        flat = s.flatten(1).argmax(1)
        i, j = flat // p, flat % p
        index[rows, i] = j
        s[rows, i, :] = -torch.inf
        s[rows, :, j] = -torch.inf
    return index


def _greedy_text_order(sim: torch.Tensor) -> torch.Tensor:
    """Positions in order, each taking its best unused image token: [B, L, P] -> [B, L] (-1 unmapped)."""
    b, n, p = sim.shape
    index = sim.new_full((b, n), -1, dtype=torch.long)
    used = torch.zeros(b, p, dtype=torch.bool, device=sim.device)
    rows = torch.arange(b, device=sim.device)
    for i in range(min(n, p)):
        j = sim[:, i].masked_fill(used, -torch.inf).argmax(-1)
        index[:, i] = j
        used[rows, j] = True
    return index


def _direct(b: int, n: int, p: int, reuse: bool, device) -> torch.Tensor:
    """Position i <- image token i (1-based over the non-header positions), wrapping with reuse."""
    pos = torch.arange(1, n + 1, device=device)
    index = pos % p if reuse else torch.where(pos < p, pos, -1)
    return index.expand(b, n)


def map_image_tokens(text: torch.Tensor, image: torch.Tensor, mode: str = "alignment-first",
                     reuse: bool = True) -> Mapping:
    """Best-aligned image token for every text position.

    text: [B, L, D] prompt hidden states (position 0 = header); image: [B, P, D] image
    tokens (index 0 = CLS). Returns a :class:`Mapping` over all L positions.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mapping mode {mode!r}; choose one of: {', '.join(MODES)}")
    sim = cosine_matrix(text, image)
    body = sim[:, 1:]
    b, n, p = body.shape
    if mode == "direct":
        idx = _direct(b, n, p, reuse, text.device)
    elif reuse:
        idx = _best(body)
    elif mode == "alignment-first":
        idx = _greedy_alignment_first(body)
    else:
        idx = _greedy_text_order(body)
    index = torch.cat([idx.new_zeros(b, 1), idx], dim=1)
    valid = index >= 0
    safe = index.clamp(min=0)
    alignment = sim.gather(-1, safe[..., None])[..., 0] * valid
    unit = F.normalize(image, dim=-1)
    direction = unit.gather(1, safe[..., None].expand(-1, -1, unit.shape[-1])) * valid[..., None]
    return Mapping(index=index, alignment=alignment, direction=direction, valid=valid)
