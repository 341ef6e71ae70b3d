"""Samplers as short pure step functions (k-diffusion style), randomness passed in.

One step moves rows from ``grid.sigmas[i]`` to ``grid.sigmas[i + 1]``::

    step(denoise, x, D, i, grid, state, noise) -> (x_next, state)

- ``x``, ``D`` [..., C, h, w]: latents (variance-exploding form, see ``grid``) and the
  model's clean prediction at them, already evaluated by the caller;
- ``state``: per-row history tensors named by ``Sampler.history`` plus ``"age"``
  [..., 1, 1, 1], the steps a row has taken; multistep samplers use a lower order
  where a row's history is shorter (first steps, img2img rows joining late);
- ``noise`` [..., K, C, h, w]: standard-normal draws, ``K = Sampler.draws``, or None;
- ``denoise(x, sigma, t)``: a further model evaluation (Heun, DPM++ SDE).

All tensor maths is elementwise over rows and all coefficients are Python floats, so
rows can be gathered (the hyperbatch branches) between steps and batch composition
never changes a row's result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from numpy.polynomial import Polynomial

from embedpin.models.schedulers import check_scheduler
from embedpin.render.grid import Grid

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """A step function, the history it keeps, its noise draws per step, and an optional
    corrector that refines ``x`` with the fresh evaluation before the step (UniPC)."""

    step: Callable
    history: tuple[str, ...] = ()
    draws: int = 0
    correct: Callable | None = None

    @property
    def stochastic(self) -> bool:
        return self.draws > 0


def _toward(D: torch.Tensor, x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``D + ratio (x - D)``: the point at noise ``ratio * sigma`` on the line from D to x."""
    return D + (x - D) * ratio


def _by_age(age: torch.Tensor, variants: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise ``variants[min(age, len - 1)]``: variant k uses k steps of history."""
    out = variants[-1]
    for k in range(len(variants) - 2, -1, -1):
        out = torch.where(age <= k, variants[k], out)
    return out


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def euler(denoise, x, D, i: int, g: Grid, state: State, noise):
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)."""
    return _toward(D, x, g.sigmas[i + 1] / g.sigmas[i]), state


def ancestral(denoise, x, D, i: int, g: Grid, state: State, noise, eta: float = 1.0):
    """Euler ancestral. On the DDIM grid this is DDIM with ``eta`` (Song et al. 2021,
    Eq. 12, in VE form); eta = 1 equals DDPM's posterior sampling (Ho et al. 2020)."""
    down, up = ancestral_sigmas(g.sigmas[i], g.sigmas[i + 1], eta)
    x = _toward(D, x, down / g.sigmas[i])
    return (x + noise.select(-4, 0) * up if up > 0 else x), state


def heun(denoise, x, D, i: int, g: Grid, state: State, noise):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); Euler for the last step."""
    s, sn = g.sigmas[i], g.sigmas[i + 1]
    x2 = _toward(D, x, sn / s)
    if sn == 0:
        return x2, state
    D2 = denoise(x2, sn, g.timesteps[i + 1])
    return x + ((x - D) / s + (x2 - D2) / sn) * ((sn - s) / 2), state


def dpmpp_2m(denoise, x, D, i: int, g: Grid, state: State, noise):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), k-diffusion's form: first order on a
    row's first step and on the last step."""
    s, sn = g.sigmas[i], g.sigmas[i + 1]
    Dd = D
    if sn > 0 and i > 0:
        r = math.log(g.sigmas[i - 1] / s) / math.log(s / sn)
        Dd = torch.where(state["age"] > 0, D + (D - state["prev"]) / (2 * r), D)
    return _toward(Dd, x, sn / s), {**state, "prev": D}


def dpmpp_sde(denoise, x, D, i: int, g: Grid, state: State, noise, eta: float = 1.0):
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``, r = 1/2): an ancestral
    half step to sqrt(sigma sigma'), a second evaluation there, an ancestral full step.
    Independent Gaussian draws per substep stand in for the Brownian tree."""
    s, sn = g.sigmas[i], g.sigmas[i + 1]
    if sn == 0:
        return D, state
    mid = math.sqrt(s * sn)
    down, up = ancestral_sigmas(s, mid, eta)
    x2 = _toward(D, x, down / s) + noise.select(-4, 0) * up
    D2 = denoise(x2, mid, g.t_of(mid))
    down, up = ancestral_sigmas(s, sn, eta)
    return _toward(D2, x, down / s) + noise.select(-4, 1) * up, state


def lagrange_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """Integral over [a, b] of each Lagrange basis polynomial on ``nodes``."""
    out = []
    for j, nj in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1:]
        basis = Polynomial.fromroots(others) / math.prod(nj - o for o in others) if others else Polynomial([1.0])
        prim = basis.integ()
        out.append(float(prim(b) - prim(a)))
    return out


_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def lms_weights(g: Grid, i: int, order: int) -> list[float]:
    """Linear multistep (k-diffusion ``sample_lms``): exact integrals of the interpolant in sigma."""
    return lagrange_weights([g.sigmas[i - k] for k in range(order)], g.sigmas[i], g.sigmas[i + 1])


def plms_weights(g: Grid, i: int, order: int) -> list[float]:
    """PLMS (Liu et al. 2022, Eq. 12): constant-step Adams-Bashforth on eps with the DDIM
    transfer (= Euler in VE form); Adams-Bashforth warm-up instead of Runge-Kutta steps."""
    return [c * (g.sigmas[i + 1] - g.sigmas[i]) for c in _ADAMS_BASHFORTH[order - 1]]


def multistep(denoise, x, D, i: int, g: Grid, state: State, noise, weights=lms_weights):
    """Order-4 linear multistep on d = (x - D) / sigma; history d1 (newest) .. d3."""
    d = (x - D) / g.sigmas[i]
    hist = [d, state["d1"], state["d2"], state["d3"]]
    variants = [x + sum(w * h for w, h in zip(weights(g, i, k), hist)) for k in range(1, min(i, 3) + 2)]
    return _by_age(state["age"], variants), {**state, "d1": d, "d2": state["d1"], "d3": state["d2"]}


def unipc(denoise, x, D, i: int, g: Grid, state: State, noise):
    """UniPC predictor UniP-2 with B(h) = expm1(-h) (Zhao et al. 2023, bh2, data
    prediction: diffusers' default), first order on a row's first and the last step."""
    s, sn = g.sigmas[i], g.sigmas[i + 1]
    out = _toward(D, x, sn / s)
    if sn > 0 and i > 0:
        h = math.log(s / sn)
        rk = math.log(s / g.sigmas[i - 1]) / h
        order2 = out - math.expm1(-h) * 0.5 * (state["m1"] - D) / rk
        out = torch.where(state["age"] > 0, order2, out)
    return out, {**state, "m2": state["m1"], "m1": D, "last": x}


def unipc_correct(x, D, i: int, g: Grid, state: State):
    """UniC corrector (Zhao et al. 2023, Alg. 1): redo the previous step from ``last``
    with the evaluation ``D`` at its result; order = the previous predictor's."""
    if i == 0:
        return x
    s0, t = g.sigmas[i - 1], g.sigmas[i]
    h = math.log(s0 / t)
    bh = math.expm1(-h)
    m1, age = state["m1"], state["age"]
    base = _toward(m1, state["last"], t / s0)
    out = torch.where(age >= 1, base - bh * 0.5 * (D - m1), x)
    if i >= 2:
        rk = math.log(s0 / g.sigmas[i - 2]) / h
        k1 = bh / -h - 1
        b0, b1 = k1 / bh, 2 * (k1 / -h - 0.5) / bh
        rho0 = (b0 - b1) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = b
        order2 = base - bh * (rho0 * (state["m2"] - m1) / rk + (b0 - rho0) * (D - m1))
        out = torch.where(age >= 2, order2, out)
    return out


_MULTISTEP = ("d1", "d2", "d3")


def make_sampler(name: str, eta: float = 0.0) -> Sampler:
    """The sampler for one of :data:`embedpin.config.SCHEDULERS` (tests/test_settings.py checks the table's keys)."""
    table = {
        "euler": Sampler(euler),
        "euler-a": Sampler(partial(ancestral, eta=1.0), draws=1),
        "ddim": Sampler(partial(ancestral, eta=eta), draws=1 if eta > 0 else 0),
        "ddpm": Sampler(partial(ancestral, eta=1.0), draws=1),
        "dpm++2m": Sampler(dpmpp_2m, ("prev",)),
        "dpm++2m-karras": Sampler(dpmpp_2m, ("prev",)),
        "dpm++sde": Sampler(dpmpp_sde, draws=2),
        "dpm++sde-karras": Sampler(dpmpp_sde, draws=2),
        "unipc": Sampler(unipc, ("m1", "m2", "last"), correct=unipc_correct),
        "heun": Sampler(heun),
        "lms": Sampler(multistep, _MULTISTEP),
        "pndm": Sampler(partial(multistep, weights=plms_weights), _MULTISTEP),
    }
    return table[check_scheduler(name)]


# Samplers whose grid comes from another diffusers scheduler: DPMSolverSDEScheduler needs
# torchsde only for its Brownian tree (not used here); PNDM's grid is DDIM's without PRK steps.
GRID_SOURCE: dict[str, tuple[str, dict]] = {
    "dpm++sde": ("euler", {}),
    "dpm++sde-karras": ("euler", {"use_karras_sigmas": True}),
    "pndm": ("ddim", {}),
}
