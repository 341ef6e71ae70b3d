"""The noise-level grid a sampler walks, taken from a diffusers scheduler.

Samplers work in the variance-exploding form of Karras et al. 2022 (EDM, Eq. 1):
``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``; the
UNet sees ``x / sqrt(sigma^2 + 1)`` at the scheduler's timestep. The diffusers
scheduler supplies the discretisation (timestep spacing, Karras sigmas, prediction
type) from the model's own scheduler config; we read it once and never call its
stateful ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Grid:
    """Noise levels ``sigmas`` [T + 1] (last 0) and model timesteps [T], as Python floats."""

    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]
    train_log_sigmas: np.ndarray  # [num_train_timesteps], increasing in t
    prediction_type: str

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def t_of(self, sigma: float) -> float:
        """Fractional model timestep of a noise level (log-sigma interpolation, as k-diffusion)."""
        return float(np.interp(math.log(sigma), self.train_log_sigmas, np.arange(len(self.train_log_sigmas))))


def make_grid(scheduler, steps: int) -> Grid:
    """Read a fresh diffusers scheduler's grid for ``steps`` steps.

    Second-order schedulers (Heun) list inner points twice; every other one is kept. DDIM-style
    schedulers have no ``sigmas``; theirs come from ``alphas_cumprod`` at the timesteps.
    Every grid ends at sigma 0, so the last step returns the model's clean prediction.
    """
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    train = ((1 - abar) / abar).sqrt()
    every = 2 if getattr(scheduler, "order", 1) == 2 else 1  # Heun: t0, t1, t1, t2, t2, ..
    ts = scheduler.timesteps.double()[::every]
    sig = getattr(scheduler, "sigmas", None)
    if isinstance(sig, torch.Tensor):
        sig = sig.double()[::every][: len(ts)]
    else:
        sig = train[ts.long()]
    return Grid(
        sigmas=(*sig.tolist(), 0.0),
        timesteps=tuple(ts.tolist()),
        train_log_sigmas=train.log().numpy(),
        prediction_type=str(scheduler.config.get("prediction_type", "epsilon")),
    )
