"""Textual-inversion files in the layouts other tools read and write, both ways.

- SD 1.x / 2.x: one tensor [N, D] under ``emb_params`` (AUTOMATIC1111's safetensors form,
  which ComfyUI and diffusers' ``load_textual_inversion`` read; ComfyUI also takes a file
  whose only tensor has another name).
- SDXL: ``clip_l`` [N, 768] and ``clip_g`` [N, 1280], one vector per text encoder (the layout
  AUTOMATIC1111, ComfyUI and kohya's sd-scripts use).

A placeholder's vector is stored here as both encoders' input embeddings side by side
[N, D1 + D2] (:func:`embedpin.guidance.encode.token_embeddings`). Only ``.safetensors`` are
read: A1111's ``.pt`` embeddings are pickles, which can run code when loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedpin.errors import InputError

SDXL_KEYS = ("clip_l", "clip_g")


def to_file_layout(vectors: torch.Tensor, widths: tuple[int, ...] | list[int], family: str) -> dict[str, torch.Tensor]:
    """Placeholder vectors [N, sum(widths)] -> the family's file tensors (``emb_params``, or
    SDXL's ``clip_l`` / ``clip_g``)."""
    widths = list(widths) or [vectors.shape[-1]]
    if sum(widths) != vectors.shape[-1]:
        raise InputError(f"token vectors of width {vectors.shape[-1]} do not match the encoders {widths}")
    if family == "SDXL":
        if len(widths) != 2:
            raise InputError("an SDXL embedding needs the widths of both text encoders")
        return {"clip_l": vectors[:, :widths[0]].contiguous(), "clip_g": vectors[:, widths[0]:].contiguous()}
    return {"emb_params": vectors.contiguous()}


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    if set(SDXL_KEYS) <= set(tensors):
        return f"an SDXL embedding (clip_l {tensors['clip_l'].shape[-1]} + clip_g {tensors['clip_g'].shape[-1]})"
    (v,) = tensors.values()
    return f"an SD 1.x / 2.x embedding (width {v.shape[-1]})"


def read_textual_inversion(path: str | Path, widths: tuple[int, ...], family: str) -> torch.Tensor:
    """A textual-inversion ``.safetensors`` -> placeholder vectors [N, sum(widths)] (float32)
    for a model of ``family`` with text encoders of ``widths``; a file of another family or
    width is an :class:`InputError` naming both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise InputError(f"{p}: embeddings are read from .safetensors only (a .pt embedding is a pickle, which can "
                         "run code: convert it on a machine you trust)")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{p}: not a readable safetensors file ({e})") from None
    tensors = {k: v for k, v in tensors.items() if v.dim() in (1, 2)}
    sdxl = set(SDXL_KEYS) <= set(tensors)
    if not sdxl:
        tensors = {k: v for k, v in tensors.items() if k == "emb_params"} or tensors
    if not sdxl and len(tensors) != 1:
        raise InputError(f"{p}: not a textual-inversion embedding (expected emb_params, or clip_l and clip_g)")
    what, model = _describe(tensors), f"{family} (text {' + '.join(map(str, widths))})"
    if sdxl != (family == "SDXL"):
        raise InputError(f"{p} is {what}; this model is {model}: use an embedding trained for this model family")
    parts = [tensors[k] for k in SDXL_KEYS] if sdxl else list(tensors.values())
    parts = [t.reshape(-1, t.shape[-1]).float() for t in parts]
    if [t.shape[-1] for t in parts] != list(widths) or len({len(t) for t in parts}) != 1 or not len(parts[0]):
        raise InputError(f"{p} is {what}; this model is {model}: the widths do not match")
    return torch.cat(parts, dim=-1)
