"""FlexDiffuse tweening weights: how far each text token moves toward its mapped image token.

All parameters are continuous tensors [λ] (one value per candidate) so CMA-ES can move
them; all functions return weights [λ, L] for the L sequence positions.

- linear: a ramp from ``linear_start`` (position 0) to ``linear_end`` (last position);
  the back of the sequence carries style, the front the main concepts.
- clustered: a profile in [0, 1] with peaks where the alignment is above its average
  (height relative to the strongest peak), sloping linearly to 0 over ``radius`` positions
  into the valleys; scaled by ``clustered``.
- threshold: ``threshold`` on positions whose alignment is above ``threshold_floor``; a
  soft step (logistic, width ``softness``) instead of a hard one keeps it continuous.

Blending: the three weights add up, then the sum is capped symmetrically by
``max_image`` (|w| <= max_image) and the header's by ``header_cap`` (|w_0| <= header_cap).
Negative weights push tokens away from the image. Unmapped positions get weight 0.
"""

from __future__ import annotations

import torch


def linear_ramp(start: torch.Tensor, end: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor:
    """start, end [λ] -> [λ, L] ramp from start at position 0 to end at position L-1, or, for
    a prompt in chunks of ``window`` positions, the same ramp over every chunk."""
    w = window or length
    t = torch.linspace(0, 1, w, device=start.device, dtype=start.dtype).repeat(length // w)
    return start[:, None] + (end - start)[:, None] * t


def cluster_profile(alignment: torch.Tensor, radius: float = 4.0) -> torch.Tensor:
    """Peaks above the average alignment, sloping into the valleys: [B, L] -> [B, L] in [0, 1].

    Peak height h_j = relu(a_j - mean) / (max - mean) over non-header positions; the profile is
    max_j h_j * relu(1 - |i - j| / radius).
    """
    body = alignment[:, 1:]
    mean = body.mean(-1, keepdim=True)
    span = (body.amax(-1, keepdim=True) - mean).clamp(min=1e-6)
    height = torch.cat([alignment.new_zeros(alignment.shape[0], 1), (body - mean).clamp(min=0) / span], dim=1)
    pos = torch.arange(alignment.shape[1], device=alignment.device, dtype=alignment.dtype)
    slope = (1 - (pos[:, None] - pos[None, :]).abs() / radius).clamp(min=0)  # [i, j]
    return (height[:, None, :] * slope).amax(-1)


def threshold_gate(alignment: torch.Tensor, floor: torch.Tensor, softness: float = 0.02) -> torch.Tensor:
    """Soft step of the alignment above ``floor``: alignment [1, L], floor [λ] -> [λ, L] in (0, 1)."""
    return torch.sigmoid((alignment - floor[:, None]) / softness)


def tween_weights(alignment: torch.Tensor, profile: torch.Tensor, valid: torch.Tensor,
                  params: dict[str, torch.Tensor], softness: float = 0.02, window: int | None = None) -> torch.Tensor:
    """Per-token image weights [λ, L] from the FlexDiffuse parameters (each [λ]).

    alignment, profile: [1, L]; valid: [1, L] bool. ``params`` keys: linear_start,
    linear_end, clustered, threshold, threshold_floor, max_image, header_cap. A prompt in
    chunks of ``window`` positions has a ramp and a header (its BOS) per chunk.
    """
    p = params
    w = (linear_ramp(p["linear_start"], p["linear_end"], alignment.shape[-1], window)
         + p["clustered"][:, None] * profile
         + p["threshold"][:, None] * threshold_gate(alignment, p["threshold_floor"], softness))
    cap = p["max_image"].abs()[:, None]
    w = torch.minimum(torch.maximum(w, -cap), cap)
    head = p["header_cap"].abs()[:, None]
    is_header = torch.arange(w.shape[1], device=w.device) % (window or w.shape[1]) == 0
    w = torch.where(is_header, torch.minimum(torch.maximum(w, -head), head), w)
    return w * valid


def tween(text: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """text + w * (target - text) per token: text [λ|1, L, D], target [λ|1, L, D], weights [λ, L]."""
    return text + weights[..., None] * (target - text)
