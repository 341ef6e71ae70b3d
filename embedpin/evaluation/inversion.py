"""Textual inversion as a stage of the run: the placeholders' vectors fitted by gradient
descent on the diffusion model's own training objective on the targets.

Gal et al. 2022 ("An Image is Worth One Word", eq. 2): with x0 the targets' latents, t a
training timestep, ε ~ N(0, I) and x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4),

    v* = argmin_v  E_{x0, t, ε} || m ⊙ (y_t - f_θ(x_t, t, c(prompt, v))) ||² / E[m],

where c(prompt, v) is the text encoder's conditioning of the usage prompt with the
placeholders' input embeddings v, f_θ the UNet, y_t its training target (ε for ε-prediction,
√ᾱ_t ε - √(1 - ᾱ_t) x0 for v-prediction, Salimans & Ho 2022) and m the targets' masks at
latent resolution (1 without masks); the masked-out part of a target is a fixed grey before
it is encoded (``scoring.masks.readable_targets``: the VAE's receptive field would otherwise
carry it into the latents under the mask), so it steers nothing.
Unlike the usual recipe, the vectors are trained inside the prompt the user will write
(``"<prompt> <v1> <v2>"``), so they learn what the prompt does not already say, and every
step draws a batch of (target, t, ε) samples sharing one text encoding. Adam (Kingma & Ba
2015) steps in units of the token table's mean row norm, so one learning rate fits every
model. All randomness comes from one seeded generator: the same settings give the same
vectors.

The denoising loss is not the rendered result's loss: on some targets the fitted vectors render
further from the target than the init words, or than an earlier point of the fit, on seeds the
fit never saw: the objective scores single denoising steps from noised targets, not whole
samplings from noise. :func:`invert_path` keeps evenly spaced points of the fit,
so that the run can validate them beside the init words and start its search at the best.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from embedpin.config import OptimConfig, SearchConfig
from embedpin.errors import ModelError
from embedpin.guidance.context import GuidanceContext
from embedpin.guidance.deltas import emphasis, insert_vectors
from embedpin.guidance.encode import encode_from_embeds
from embedpin.render.latents import encode as encode_latents
from embedpin.render.sampler import sdxl_time_ids
from embedpin.scoring.masks import readable_targets


class NoGradient(ModelError):
    """The model cannot be differentiated with respect to the token vectors."""


@dataclass(frozen=True)
class InversionSettings:
    """steps of ``batch`` (target, timestep, noise) samples; ``lr``: Adam's step per coordinate,
    in units of a typical coordinate (the token table's mean row norm / √Din); ``seed``: the
    stage's generator."""

    steps: int = SearchConfig.inversion_steps  # (defaults: the run config's, held once in embedpin.config)
    batch: int = SearchConfig.inversion_batch
    lr: float = SearchConfig.inversion_lr
    seed: int = OptimConfig.seed


def alphas_cumprod(components) -> torch.Tensor:
    """ᾱ_t [T] of the model's training noise schedule (its scheduler config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(components.scheduler_config).alphas_cumprod.float()


def training_target(noise: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the UNet was trained to output at x_t: ε, or v = √ᾱ ε - √(1-ᾱ) x0."""
    if prediction == "v_prediction":
        a = alpha_bar.view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    return noise


def latent_masks(masks: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor:
    """Masks [T, 1, H, W] (None: all ones) averaged down to the latents' grid [T, 1, h, w]."""
    if masks is None:
        return latents.new_ones(latents.shape[0], 1, *latents.shape[2:])
    return torch.nn.functional.adaptive_avg_pool2d(masks.to(latents), latents.shape[2:])


def conditioning(ctx: GuidanceContext, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The usage prompt's conditioning [1, L, D] (SDXL: and pooled [1, P]) with placeholder
    vectors [N, Din], differentiable in the vectors (written emphasis applied)."""
    plain = ctx.plain
    embeds = insert_vectors(plain.input_embeds, vectors[None], plain.placeholders)
    text, pooled = encode_from_embeds(ctx.components, embeds, plain.ids, plain.ids_2, ctx.options.clip_skip)
    if plain.weighted:
        text = emphasis(text, plain.weights[None], plain.positions)
    return text, pooled


def _unet_kwargs(components, pooled: torch.Tensor | None, n: int, size: tuple[int, int]) -> dict:
    """SDXL's added conditioning for a batch of n (time ids: the render size, no crop)."""
    if pooled is None:
        return {}
    ids = sdxl_time_ids(*size, pooled.device, pooled.dtype).expand(n, -1)
    return {"added_cond_kwargs": {"text_embeds": pooled.expand(n, -1), "time_ids": ids}}


def invert(ctx: GuidanceContext, targets: torch.Tensor, settings: InversionSettings,
           masks: torch.Tensor | None = None, progress: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """The placeholders' vectors [N, Din] fitted to ``targets`` [T, 3, H, W] in [0, 1] (masks
    [T, 1, H, W] or None), starting at ``ctx.vector_init``; ``progress(step, loss)`` after each
    step."""
    return invert_path(ctx, targets, settings, masks, progress)[-1]


def checkpoint_steps(steps: int, points: int) -> list[int]:
    """The steps after which :func:`invert_path` keeps the vectors: ``points`` evenly spaced ones,
    the last step included (fewer where the fit has fewer steps)."""
    return sorted({max(1, round(steps * (k + 1) / points)) for k in range(points)}) if steps else []


def invert_path(ctx: GuidanceContext, targets: torch.Tensor, settings: InversionSettings,
                masks: torch.Tensor | None = None, progress: Callable[[int, float], None] | None = None,
                points: int = 1) -> torch.Tensor:
    """:func:`invert`, keeping the vectors after each of :func:`checkpoint_steps`: [K, N, Din],
    the fit's end last. The path is the fit's: keeping more points changes no vector."""
    if torch.is_inference_mode_enabled():
        raise NoGradient("the model runs in inference mode (as ComfyUI runs its nodes): no gradient for the token "
                         "vectors")
    comp = ctx.components
    unet, dtype = comp.unet, comp.dtype
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        x0 = encode_latents(comp.vae, readable_targets(targets.to(comp.device), masks))
    weights = latent_masks(masks, x0)
    alpha_bars = alphas_cumprod(comp).to(x0.device)
    prediction = comp.scheduler_config.get("prediction_type", "epsilon")
    scale = ctx.vector_scale / math.sqrt(ctx.vector_init.shape[-1])  # a typical coordinate's size
    v = (ctx.vector_init.detach().float() / scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=settings.lr)
    size = (targets.shape[-2], targets.shape[-1])
    requires = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    for te in comp.text_encoders:
        te.requires_grad_(False)
    keep, kept = set(checkpoint_steps(settings.steps, points)), []
    try:
        for step in range(settings.steps):
            i = torch.randint(len(x0), (settings.batch,), generator=gen).to(x0.device)
            t = torch.randint(len(alpha_bars), (settings.batch,), generator=gen).to(x0.device)
            noise = torch.randn((settings.batch, *x0.shape[1:]), generator=gen).to(x0)
            a = alpha_bars[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0[i] + (1 - a).sqrt() * noise
            text, pooled = conditioning(ctx, v * scale)
            out = unet(xt.to(dtype), t, encoder_hidden_states=text.to(dtype).expand(settings.batch, -1, -1),
                       **_unet_kwargs(comp, None if pooled is None else pooled.to(dtype), settings.batch, size)).sample
            err = (out.float() - training_target(noise, x0[i], alpha_bars[t], prediction)).square()
            m = weights[i]
            loss = (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1e-8)
            opt.zero_grad(set_to_none=True)
            _backward(loss)
            opt.step()
            if step + 1 in keep:
                kept.append((v.detach() * scale).to(ctx.vector_init))
            if progress is not None:
                progress(step, loss.item())
    finally:
        for p, r in zip(unet.parameters(), requires):
            p.requires_grad_(r)
    return torch.stack(kept) if kept else ctx.vector_init[None].clone()


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()``, or :class:`NoGradient` where the model gives none (an inference-only
    module, a graph that does not reach the vectors)."""
    if not loss.requires_grad:
        raise NoGradient("the model gives no gradient for the token vectors")
    try:
        loss.backward()
    except RuntimeError as e:
        raise NoGradient(f"the model's backward pass failed: {str(e).splitlines()[0]}") from None
