"""VAE encode/decode between images in [0, 1] and scaled latents, in chunks."""

from __future__ import annotations

import torch

from embedpin.render.memory import in_chunks


def _scale_shift(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift or 0.0)


def encode(vae, images: torch.Tensor, max_batch: int = 64) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] -> latents [N, C, H/f, W/f]: the posterior mean,
    shifted and scaled as the UNet expects (Rombach et al. 2022, Sec. 3.1)."""
    scale, shift = _scale_shift(vae)
    dtype = next(vae.parameters()).dtype
    out, _ = in_chunks(lambda a, b: vae.encode((images[a:b] * 2 - 1).to(dtype)).latent_dist.mean.float(),
                       len(images), max_batch)
    return (torch.cat(out) - shift) * scale


def decode(vae, latents: torch.Tensor, max_batch: int = 64) -> torch.Tensor:
    """Latents [N, C, h, w] -> images [N, 3, h*f, w*f] in [0, 1], ``max_batch`` at a time
    (fewer after an out-of-memory error)."""
    scale, shift = _scale_shift(vae)
    dtype = next(vae.parameters()).dtype
    out, _ = in_chunks(lambda a, b: vae.decode((latents[a:b] / scale + shift).to(dtype)).sample.float(),
                       len(latents), max_batch)
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)
