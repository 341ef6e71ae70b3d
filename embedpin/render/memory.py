"""Batches that fit the device: a probe for ``--max-batch auto`` and a fallback that halves
a chunk on an out-of-memory error instead of ending the run.

The probe runs the UNet at the render size on one and on two latents (each with its two CFG
halves) and reads the peak memory of each: the difference is what one more latent costs, the
rest is fixed. The batch is what the free memory holds at ``margin`` of it. It is measured,
not predicted from the architecture, so attention kernels, dtype and resolution all count.
"""

from __future__ import annotations

import torch

from embedpin.config import CPU_MAX_BATCH

MARGIN = 0.8         # of the free memory: the VAE, CLIP, FLIP and the allocator's slack share the rest


def batch_for_memory(free: int, fixed: int, per_latent: int, cap: int = CPU_MAX_BATCH) -> int:
    """UNet images per call (two per latent: CFG) that ``free`` bytes hold at :data:`MARGIN`,
    given a ``fixed`` cost and ``per_latent`` bytes per latent; at least 2, at most ``cap``."""
    latents = int((free * MARGIN - fixed) // max(per_latent, 1))
    return max(2, min(cap, 2 * latents))


@torch.no_grad()
def probe_max_batch(components, height: int, width: int, cap: int = CPU_MAX_BATCH) -> int:
    """``--max-batch auto``: the largest UNet batch the device's free memory holds for renders
    of height x width (CUDA: measured; other devices: ``cap``)."""
    device = components.device
    if device.type != "cuda":
        return cap
    unet, f = components.unet, components.vae_scale_factor
    shape = (components.latent_channels, height // f, width // f)
    dtype = next(unet.parameters()).dtype
    width_text = unet.config.cross_attention_dim
    peaks = []
    for latents in (1, 2):
        n = 2 * latents
        kwargs = {}
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, pooled, device=device, dtype=dtype),
                                           "time_ids": torch.zeros(n, 6, device=device, dtype=dtype)}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        unet(torch.zeros(n, *shape, device=device, dtype=dtype), torch.full((n,), 500.0, device=device),
             encoder_hidden_states=torch.zeros(n, 77, width_text, device=device, dtype=dtype), **kwargs)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    free, _ = torch.cuda.mem_get_info(device)
    per_latent = max(peaks[1] - peaks[0], 1)
    return batch_for_memory(free, peaks[0] - per_latent, per_latent, cap)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (CUDA or MPS)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def in_chunks(fn, n: int, size: int) -> tuple[list, int]:
    """``fn(start, stop)`` over [0, n) in chunks of ``size``; a chunk that runs out of device
    memory is retried at half the size (down to 1), and the rest go at that size. Returns
    (the outputs in order, the size that worked)."""
    out, start = [], 0
    while start < n:
        try:
            out.append(fn(start, min(start + size, n)))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if size == 1 or not out_of_memory(e):
                raise
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = min(start + size, n)
    return out, size
