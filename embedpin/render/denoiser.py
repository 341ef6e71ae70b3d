"""The classifier-free-guided denoiser shared by all candidates of a generation."""

from __future__ import annotations

import math

import torch

from embedpin.errors import ModelError
from embedpin.render.memory import in_chunks


def to_denoised(out: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """Model output -> clean prediction D(x, sigma) in VE form (Karras et al. 2022, Table 1)."""
    if prediction_type == "epsilon":
        return x - out * sigma
    if prediction_type == "v_prediction":
        return x / (sigma**2 + 1) - out * (sigma / math.sqrt(sigma**2 + 1))
    if prediction_type == "sample":
        return out
    raise ModelError(f"unsupported prediction type {prediction_type!r}")


class GuidedDenoiser:
    """D(x, sigma) for rows x [λ, n, C, h, w] of λ candidates, with classifier-free guidance
    (Ho & Salimans 2022): ``u + cfg (c - u)`` on the model outputs.

    Every latent's unconditional and conditional halves sit side by side in one UNet
    call; calls hold at most ``max_batch`` images (fewer after an out-of-memory error:
    :func:`~embedpin.render.memory.in_chunks`); ``evals`` counts the images evaluated.
    Rows of candidates not in ``active`` (img2img rows that have not started) are not
    evaluated; their D is x itself. SDXL's UNet also takes ``added``: (pooled [λ, P],
    negative pooled [1 or λ, P], time ids [1, 6]), batched like the sequences.
    """

    def __init__(self, unet, cond: torch.Tensor, negative: torch.Tensor, cfg: torch.Tensor,
                 prediction_type: str, max_batch: int, added: tuple | None = None):
        self.unet, self.prediction_type = unet, prediction_type
        self.dtype = next(unet.parameters()).dtype
        self.cond = cond.to(self.dtype)
        self.negative = negative.to(self.dtype).expand_as(self.cond)
        self.cfg = cfg.float()
        self.per_call = max(max_batch // 2, 1)
        self.evals = 0
        self.pooled = self.negative_pooled = self.time_ids = None
        if added is not None:
            pooled, negative_pooled, self.time_ids = (a.to(self.dtype) for a in added)
            self.pooled, self.negative_pooled = pooled, negative_pooled.expand_as(pooled)

    def _added(self, c: torch.Tensor) -> dict:
        """UNet keyword arguments for candidates c [M] (each twice: negative, positive)."""
        if self.pooled is None:
            return {}
        text = torch.stack([self.negative_pooled[c], self.pooled[c]], 1).flatten(0, 1)
        return {"added_cond_kwargs": {"text_embeds": text, "time_ids": self.time_ids.expand(len(text), -1)}}

    def _pairs(self, x: torch.Tensor, c: torch.Tensor, t: float) -> torch.Tensor:
        """One UNet call on latents x [m, C, h, w] of candidates c [m], each with its negative
        and positive half: the guided outputs [m, C, h, w]."""
        pair = x.unsqueeze(1).expand(-1, 2, *x.shape[1:]).flatten(0, 1).to(self.dtype)
        ehs = torch.stack([self.negative[c], self.cond[c]], 1).flatten(0, 1)
        ts = torch.full((len(pair),), t, device=x.device, dtype=torch.float32)
        out = self.unet(pair, ts, encoder_hidden_states=ehs, **self._added(c)).sample
        u, v = out.float().unflatten(0, (-1, 2)).unbind(1)
        self.evals += len(pair)
        return u + self.cfg[c].view(-1, 1, 1, 1) * (v - u)

    def _guided(self, lat: torch.Tensor, t: float, cand: torch.Tensor) -> torch.Tensor:
        """Guided model output for latents [M, C, h, w] of candidates ``cand`` [M], in calls of
        ``per_call`` latents (halved for the rest of the render when one runs out of memory)."""
        outs, self.per_call = in_chunks(lambda a, b: self._pairs(lat[a:b], cand[a:b], t), len(lat), self.per_call)
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor, sigma: float, t: float, active: torch.Tensor | None = None) -> torch.Tensor:
        xa = x if active is None else x.index_select(0, active)
        if xa.numel() == 0:
            return x
        cand = (torch.arange(len(x), device=x.device) if active is None else active).repeat_interleave(x.shape[1])
        lat = xa.flatten(0, 1)
        out = self._guided(lat / math.sqrt(sigma**2 + 1), t, cand)
        D = to_denoised(out, lat, sigma, self.prediction_type).view_as(xa)
        return D if active is None else x.index_copy(0, active, D)
