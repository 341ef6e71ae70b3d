"""Hyperbatch rendering of all candidates of a generation, and exact replay of one image.

Every candidate starts from one latent that doubles at the branch steps of
``schedule.branch_schedule`` until it holds B latents; all λ candidates' rows share each
step's UNet calls. Siblings diverge after a branch with every sampler:

- the copy born at step 0 (half of all image pairs split there) is a second root: fresh
  initial noise and its own row in the step-0 evaluation (one more per candidate, 1/160 of
  a plain B=8 render; ``schedule.BranchPath.starting``). Re-noising it fully from the parent's
  evaluation instead biases it (the parent's CFG-amplified prediction paired with foreign
  noise), and re-noising it partly leaves the pair's noise correlated
  (``benchmarks/hyperbatch.py`` compares siblings' diversity with independent seeds');
- stochastic samplers (euler-a, ddpm, dpm++sde, ddim with eta > 0) draw each member's
  step noise from its own stream (``noise.NoiseStreams``);
- at later branches, deterministic samplers (euler, heun, lms, pndm, dpm++2m, unipc, ddim
  with eta = 0) would keep a copied latent on its parent's ODE path (identical images:
  no diversity from branching), so a copy's branch step is made ancestral ("SDE-ified"): with D
  the shared evaluation at sigma, eps = (x - D) / sigma its noise and z ~ N(0, I) from the
  copy's own stream,

      x_copy = D + sigma (sqrt(1 - rho^2) eps + rho z),   rho = sigma_up / sigma_next,

  with sigma_up of an ancestral step sigma -> sigma_next of eta ``plan.renoise`` (default
  1: the DDPM posterior's amount; k-diffusion ``get_ancestral_step``). The noise level stays
  sigma, and the sampler's update then takes the copy to ``D + sigma_down eps + sigma_up z``,
  exactly Euler-ancestral's step. Replacing all of the noise (rho = 1) instead would pair
  the parent's posterior mean with foreign noise, which biases copies (washed-out colours
  on the micro model). Every per-row state tensor (multistep history) is gathered by parent
  index; a re-noised copy then restarts its solver at first order (age 0), as linear
  multistep history in noise space (LMS, PLMS) belongs to the parent's noise and would be
  extrapolated across the jump.

An image is a function of (conditioning, plan, its lineage row) only, which is what
``render_one`` replays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from embedpin.config import CPU_MAX_BATCH, MICRO, OptimConfig, RenderConfig
from embedpin.errors import ConfigError
from embedpin.models.components import make_scheduler
from embedpin.models.schedulers import check_scheduler
from embedpin.render.denoiser import GuidedDenoiser
from embedpin.render.grid import Grid, make_grid
from embedpin.render.latents import decode, encode
from embedpin.render.noise import NoiseStreams, member_seeds
from embedpin.render.schedule import Branch, BranchPath, batch_path, branch_schedule, check_lineage_row, image_path, lineage
from embedpin.render.solvers import GRID_SOURCE, Sampler, ancestral_sigmas, make_sampler


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class RenderPlan:
    """How to render: B images per candidate, sampler, size, seed and memory budget.

    ``roots`` independent initial latents per candidate (a power of two; the rest of the
    batch branches from them, ``schedule.branch_schedule``); ``max_batch`` bounds the images
    per UNet call, CFG halves included. ``renoise`` is the
    eta of the ancestral step a copy takes at a branch after step 0 (module doc): None means
    1 (the DDPM posterior's amount) for deterministic samplers and 0 for stochastic ones,
    whose own step noise separates siblings. ``eta`` is DDIM's (0: deterministic).
    """

    batch: int = RenderConfig.batch  # (defaults: the run config's, held once in embedpin.config;
    steps: int = MICRO.steps         # model-dependent ones: the built-in model's)
    scheduler: str = MICRO.scheduler
    height: int = 64
    width: int = 64
    seed: int = OptimConfig.seed
    hyperbatch: bool = RenderConfig.hyperbatch
    max_batch: int = CPU_MAX_BATCH
    renoise: float | None = RenderConfig.renoise
    eta: float = 0.0
    roots: int = RenderConfig.roots

    def validate(self, vae_scale_factor: int | None = None) -> RenderPlan:
        """Raise ConfigError on a value a user could have mistyped; return self. ``max_batch``,
        ``renoise`` and ``roots`` come from a run's config, checked there (RunConfig.validate), or
        are the defaults; only what other callers give (the render command's steps) is checked here."""
        for name in ("batch", "steps", "height", "width"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_scheduler(self.scheduler)
        if not self.eta >= 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta!r}")
        f = vae_scale_factor
        if f and (self.height % f or self.width % f):
            raise ConfigError(f"image size {self.width}x{self.height} must be a multiple of the VAE factor {f}")
        return self

    def schedule(self) -> list[int]:
        """Branch steps of this plan (``[]`` for plain batches)."""
        return branch_schedule(self.batch, self.steps, self.roots) if self.hyperbatch else []

    def branch_eta(self, sampler: Sampler) -> float:
        """The eta of the ancestral step a copy takes at its branch (see module doc)."""
        if self.renoise is not None:
            return float(self.renoise)
        return 0.0 if sampler.stochastic else 1.0


@dataclass
class RenderResult:
    """images [λ, B, 3, H, W] in [0, 1]; lineage [B, depth] (each image's member at each
    depth); seeds [B, depth] (those members' stream seeds); unet_evals: UNet image
    evaluations of the whole render, CFG halves counted; schedule: the branch steps."""

    images: torch.Tensor
    lineage: torch.Tensor
    seeds: torch.Tensor
    unet_evals: int
    schedule: list[int]

    @property
    def roots(self) -> torch.Tensor:
        """Each image's root [B] (images of different roots have independent noise)."""
        return self.lineage[:, sum(1 for s in self.schedule if s == 0)]


def plan_grid(components, plan: RenderPlan) -> Grid:
    """The plan's noise grid, from a fresh diffusers scheduler of the model's config."""
    if plan.scheduler in GRID_SOURCE:
        name, extra = GRID_SOURCE[plan.scheduler]
        return make_grid(make_scheduler(name, {**components.scheduler_config, **extra}), plan.steps)
    return make_grid(components.scheduler(plan.scheduler), plan.steps)


def _conditioning(components, cond, negative, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes; cond [λ, L, D], negative [1 or λ, L, D], cfg [λ] on the model's device."""
    dim = components.unet.config.cross_attention_dim
    if cond.dim() != 3 or cond.shape[-1] != dim:
        raise ConfigError(f"conditioning must be [candidates, tokens, {dim}], got {list(cond.shape)}")
    if negative.dim() != 3 or negative.shape[0] not in (1, len(cond)) or negative.shape[1:] != cond.shape[1:]:
        raise ConfigError(f"negative conditioning {list(negative.shape)} does not match {list(cond.shape)}")
    cfg = torch.as_tensor(cfg, dtype=torch.float32).flatten()
    if cfg.numel() == 1:
        cfg = cfg.expand(len(cond))
    if cfg.numel() != len(cond):
        raise ConfigError(f"need one CFG scale per candidate ({len(cond)}), got {cfg.numel()}")
    dev = components.device
    return cond.to(dev), negative.to(dev), cfg.to(dev)


def sdxl_time_ids(height: int, width: int, device, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning time ids [1, 6] for a render of height x width: original size,
    crop top-left (0, 0) and target size, all the render size (Podell et al. 2023, 2.2)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


def _added(components, plan: RenderPlan, pooled, negative_pooled, n: int) -> tuple | None:
    """SDXL's added conditioning (pooled [λ, P], negative pooled [1 or λ, P], time ids [1, 6]),
    checked; None for a UNet without it. Time ids: original size, crop top-left (0, 0) and
    target size, all the render size (SDXL micro-conditioning, Podell et al. 2023, 2.2)."""
    needs = getattr(components.unet.config, "addition_embed_type", None) == "text_time"
    if not needs:
        if pooled is not None:
            raise ConfigError(f"model {components.name!r} takes no pooled text embedding (not SDXL)")
        return None
    if pooled is None or negative_pooled is None:
        raise ConfigError("an SDXL UNet needs pooled text embeddings for the prompt and the negative")
    if pooled.dim() != 2 or len(pooled) != n or negative_pooled.shape[0] not in (1, n) \
            or negative_pooled.shape[1:] != pooled.shape[1:]:
        raise ConfigError(f"pooled embeddings {list(pooled.shape)} / {list(negative_pooled.shape)} do not match "
                          f"{n} candidates")
    dev = components.device
    return pooled.to(dev), negative_pooled.to(dev), sdxl_time_ids(plan.height, plan.width, dev)


def _start_steps(plan: RenderPlan, strength, n: int, init_image) -> list[int]:
    """First step of each candidate: 0, or as diffusers' img2img (``steps - int(steps * s)``)."""
    if init_image is None:
        if strength is not None:
            raise ConfigError("strength needs an init image")
        return [0] * n
    if strength is None:
        raise ConfigError("an init image needs a strength in [0, 1]")
    s = torch.as_tensor(strength, dtype=torch.float64).flatten().cpu()
    s = s.expand(n) if s.numel() == 1 else s
    if s.numel() != n:
        raise ConfigError(f"need one strength per candidate ({n}), got {s.numel()}")
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ConfigError(f"strength must be in [0, 1], got {s.tolist()}")
    return [plan.steps - min(int(plan.steps * v), plan.steps) for v in s.tolist()]


def _init_latent(components, plan: RenderPlan, init_image, shape) -> torch.Tensor:
    """Clean latent every candidate starts from: the encoded init image [1, C, h, w], or zeros."""
    dev = components.device
    if init_image is None:
        return torch.zeros((1, *shape), device=dev)
    want = (1, 3, plan.height, plan.width)
    if tuple(init_image.shape) != want:
        raise ConfigError(f"init image must be {list(want)} for this plan, got {list(init_image.shape)}")
    if not bool(((init_image >= 0) & (init_image <= 1)).all()):
        raise ConfigError("init image values must be in [0, 1]")
    return encode(components.vae, init_image.to(dev).float())


def _branch(br: Branch, x, D, state, birth, streams: NoiseStreams, eta: float, grid: Grid, keep):
    """Double the rows: gather every per-row tensor by parent, start and re-noise the copies
    (of active candidates: ``keep``). (Copies born at step 0 are roots: ``BranchPath.starting``.)"""
    p = br.parent.to(x.device)
    x, D, birth = x[:, p], D[:, p], birth[p]
    state = {k: v[:, p] for k, v in state.items()}
    new = [m for m, c in zip(br.members, br.copy.tolist()) if c]
    if new:
        c = br.copy.to(x.device)
        fresh = streams.birth(new)
        birth[c] = fresh
        sigma, sigma_next = grid.sigmas[br.step], grid.sigmas[br.step + 1]
        rho = min(1.0, ancestral_sigmas(sigma, sigma_next, eta)[1] / sigma_next)
        if rho > 0:
            renoised = D[:, c] + (x[:, c] - D[:, c]) * math.sqrt(1 - rho**2) + fresh * (rho * sigma)
            x[:, c] = _masked(keep, renoised, x[:, c])
            state["age"][:, c] = 0  # a new noise realisation: its solver restarts at first order
    return x, D, state, birth, br.members


def _activity(starts: list[int], steps: int, dev) -> list[tuple]:
    """Per step: (candidates joining now, active candidates or None for all, row mask or None)."""
    t = torch.tensor(starts)
    out = []
    for i in range(steps):
        on = t <= i
        joining = (t == i).nonzero().flatten().to(dev)
        if bool(on.all()):
            out.append((joining, None, None))
        else:
            out.append((joining, on.nonzero().flatten().to(dev), on.to(dev).view(-1, 1, 1, 1, 1)))
    return out


def _sample(components, cond, negative, cfg, plan: RenderPlan, path: BranchPath, init, starts: list[int],
            added: tuple | None = None):
    """Run the rows of ``path`` for every candidate: latents [λ, n, C, h, w] and UNet evals."""
    grid, sampler = plan_grid(components, plan), make_sampler(plan.scheduler, plan.eta)
    eta, lam, dev = plan.branch_eta(sampler), len(cond), components.device
    streams = NoiseStreams(plan.seed, init.shape[1:], dev)
    members = path.members
    birth = streams.birth(members)
    x = init.expand(lam, len(members), *init.shape[1:]).clone()
    state = {k: torch.zeros_like(x) for k in sampler.history}
    state["age"] = x.new_zeros(lam, len(members), 1, 1, 1)
    model = GuidedDenoiser(components.unet, cond, negative, cfg, grid.prediction_type, plan.max_batch, added)
    branches = {b.step: b for b in path.branches}
    for i, (joining, active, keep) in enumerate(_activity(starts, grid.steps, dev)):
        sigma = grid.sigmas[i]
        if len(joining):
            x[joining] = init + sigma * birth
            state["age"][joining] = 0
        denoise = partial(model, active=active)
        D = denoise(x, sigma, grid.timesteps[i])
        if sampler.correct is not None:
            x = _masked(keep, sampler.correct(x, D, i, grid, state), x)
        if i in branches:
            x, D, state, birth, members = _branch(branches[i], x, D, state, birth, streams, eta, grid, keep)
        noise = streams.step(members, sampler.draws) if sampler.draws else None
        x_next, state = sampler.step(denoise, x, D, i, grid, state, noise)
        x = _masked(keep, x_next, x)
        state["age"] = state["age"] + 1
    return x, model.evals


def _masked(keep, new, old):
    return new if keep is None else torch.where(keep, new, old)


def _latent_shape(components, plan: RenderPlan) -> tuple[int, int, int]:
    f = components.vae_scale_factor
    return components.latent_channels, plan.height // f, plan.width // f


@torch.no_grad()
def render(components, cond: torch.Tensor, negative: torch.Tensor, cfg, plan: RenderPlan,
           init_image: torch.Tensor | None = None, strength=None, pooled: torch.Tensor | None = None,
           negative_pooled: torch.Tensor | None = None) -> RenderResult:
    """Render B images for each of λ candidates with hyperbatch (or plain) sampling.

    cond [λ, L, D] and negative [1 or λ, L, D] text-encoder outputs, cfg [λ] (or a float),
    optional init_image [1, 3, H, W] in [0, 1] with strength [λ] (or a float) for img2img;
    SDXL: pooled [λ, P] and negative_pooled [1 or λ, P] too.
    """
    plan.validate(components.vae_scale_factor)
    cond, negative, cfg = _conditioning(components, cond, negative, cfg)
    added = _added(components, plan, pooled, negative_pooled, len(cond))
    starts = _start_steps(plan, strength, len(cond), init_image)
    init = _init_latent(components, plan, init_image, _latent_shape(components, plan))
    schedule = plan.schedule()
    latents, evals = _sample(components, cond, negative, cfg, plan, batch_path(plan.batch, schedule), init, starts,
                             added)
    images = decode(components.vae, latents.flatten(0, 1), plan.max_batch)
    lin = lineage(plan.batch, schedule)
    return RenderResult(images.unflatten(0, latents.shape[:2]), lin, member_seeds(plan.seed, lin), evals, schedule)


@torch.no_grad()
def render_one(components, cond: torch.Tensor, negative: torch.Tensor, cfg, plan: RenderPlan,
               lineage_row: torch.Tensor, init_image: torch.Tensor | None = None, strength=None,
               pooled: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Re-render one image [3, H, W] of ``render`` alone from its conditioning cond [1, L, D],
    the same plan and its ``lineage_row`` [depth]: replays only that image's path."""
    plan.validate(components.vae_scale_factor)
    cond, negative, cfg = _conditioning(components, cond, negative, cfg)
    if len(cond) != 1:
        raise ConfigError(f"render_one takes one candidate's conditioning, got {len(cond)}")
    added = _added(components, plan, pooled, negative_pooled, 1)
    schedule = plan.schedule()
    row = torch.as_tensor(lineage_row).flatten()
    check_lineage_row(row, plan.batch, schedule)
    starts = _start_steps(plan, strength, 1, init_image)
    init = _init_latent(components, plan, init_image, _latent_shape(components, plan))
    latents, _ = _sample(components, cond, negative, cfg, plan, image_path(row, schedule), init, starts, added)
    return decode(components.vae, latents.flatten(0, 1), plan.max_batch)[0]


def plain(plan: RenderPlan) -> RenderPlan:
    """The same plan without hyperbatching (B independent latents from step 0)."""
    return replace(plan, hyperbatch=False)
