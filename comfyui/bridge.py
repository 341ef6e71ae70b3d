"""Between ComfyUI's objects and embedpin's: the model the workflow loaded as embedpin components
(its weight tensors used in place), pinned tensors as ComfyUI CONDITIONING, IMAGE / MASK tensors
as the files a run keeps, and ComfyUI's progress bar and interrupt button as a run's hooks."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import comfy.model_management
import comfy.utils
import numpy as np
import torch
from PIL import Image

from embedpin.errors import ConfigError, InputError, ModelError
from embedpin.models.checkpoint import components_from_weights
from embedpin.models.components import Components
from embedpin.models.loader import quiet_libraries
from embedpin.runner import RunHooks, StopRun
from embedpin.store import save_image

ENCODERS = ("clip_l", "clip_h", "clip_g")  # ComfyUI's names, in conditioning order
PREDICTIONS = {"EPS": "epsilon", "V_PREDICTION": "v"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def text_encoders(clip) -> list[dict]:
    """The CLIP's text encoders in transformers' names, in conditioning order (tensors in place)."""
    state = clip.cond_stage_model.state_dict()
    out = []
    for name in ENCODERS:
        prefix = f"{name}.transformer."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            out.append(part)
    return out


def components(model, clip, vae, name: str) -> Components:
    """embedpin components of the workflow's MODEL, CLIP and VAE: ComfyUI loads them as it samples
    with them (its device, its dtype, LoRA patches applied), and their tensors become the diffusers
    modules' weights without a copy (weights ComfyUI keeps in another dtype than it computes the
    UNet in, a float16 text encoder on a CPU say, are cast)."""
    if model is None or clip is None or vae is None:
        raise ModelError("the Pin node needs the MODEL, CLIP and VAE of one checkpoint loader")
    quiet_libraries()
    comfy.model_management.load_models_gpu([model, clip.patcher, vae.patcher], force_full_load=True)
    kind = model.model.model_type.name
    if kind not in PREDICTIONS:
        raise ModelError(f"ComfyUI samples this model as {kind}; embedpin pins epsilon and v-prediction models "
                         "(SD 1.x, SD 2.x, SDXL)")
    unet = model.model.diffusion_model.state_dict()
    parts = components_from_weights(unet, vae.first_stage_model.state_dict(), text_encoders(clip), name,
                                    {"modelspec.prediction_type": PREDICTIONS[kind]})
    comp = Components(name=name, source="ComfyUI", **parts)
    for m in (*comp.text_encoders, comp.unet, comp.vae):
        m.eval().requires_grad_(False)
    first = next(iter(unet.values()))  # ComfyUI's device, and the dtype it computes in (stored weights it casts)
    return comp.to(first.device, getattr(model.model, "manual_cast_dtype", None) or first.dtype)


def check_name(name: str) -> str:
    """The embedding's name: a file name in ``models/embeddings`` and ``embedding:NAME`` in prompts."""
    name = name.strip()
    if not NAME.match(name):
        raise ConfigError(f"embedding name {name!r}: use letters, digits, '-', '_' and '.' (at most 64, no folders)")
    return name


def check_masks(images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """ComfyUI's MASK [H, W] or [B, H, W] (1 = pin, 0 = ignore) for IMAGE [B, H, W, C]: one for
    all targets or one per target, each the target's size and not empty."""
    if mask is None:
        return None
    masks = mask[None] if mask.dim() == 2 else mask
    b, h, w = images.shape[:3]
    if masks.shape[-2:] != (h, w):
        raise InputError(f"the mask is {masks.shape[-1]}x{masks.shape[-2]} but the target is {w}x{h}: give a mask of "
                         "the target's size")
    if len(masks) not in (1, b):
        raise InputError(f"{len(masks)} masks for {b} targets: give one mask for all or one per target")
    if any(float(m.max()) <= 0.5 / 255 for m in masks):
        raise InputError("the mask is empty (all 0): it would pin nothing of the target; white (1) marks what to pin")
    return masks


def save_images(images: torch.Tensor, masks: torch.Tensor | None, folder: Path) -> tuple[list[str], list[str]]:
    """IMAGE [B, H, W, C] and MASK [B', H, W] in [0, 1] as PNGs in ``folder`` (targets, masks)."""
    targets = [str(save_image(folder / f"target_{i:02d}.png", Image.fromarray(_uint8(img[..., :3]))))
               for i, img in enumerate(images)]
    masks = [str(save_image(folder / f"mask_{i:02d}.png", Image.fromarray(_uint8(m))))
             for i, m in enumerate(masks if masks is not None else [])]
    return targets, masks


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def fingerprint(settings: dict, images: torch.Tensor, masks: torch.Tensor | None, comp: Components) -> str:
    """What makes a Pin run: its settings, targets, masks and model (its widths and a few weights'
    sums, which LoRA patches change): the same inputs find the same run folder again."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in (images, masks):
        if t is not None:
            h.update(_uint8(t).tobytes())
    for m in (comp.unet, comp.vae, *comp.text_encoders):
        first, last = next(iter(m.parameters())), list(m.parameters())[-1]
        h.update(f"{first.shape} {float(first.double().sum())} {last.shape} {float(last.double().sum())}".encode())
    return h.hexdigest()[:12]


def conditioning(tensors: dict, recipe: dict) -> tuple[list, list]:
    """A pinned result as ComfyUI CONDITIONING (positive, negative): [[embeddings [1, L, D], extras]];
    SDXL's carry the pooled output and the size the result was pinned at (SDXL's size conditioning)."""
    def one(embeds: str, pooled: str) -> list:
        extras = {}
        if pooled in tensors:
            h, w = int(recipe["height"]), int(recipe["width"])
            extras = {"pooled_output": tensors[pooled].float().cpu(), "width": w, "height": h, "crop_w": 0,
                      "crop_h": 0, "target_width": w, "target_height": h}
        return [[tensors[embeds].float().cpu(), extras]]

    return one("prompt_embeds", "pooled_prompt_embeds"), one("negative_prompt_embeds", "negative_pooled_prompt_embeds")


class Hooks(RunHooks):
    """ComfyUI's progress bar (generations, moving within one as the UNet runs) and its interrupt
    button (checked at every UNet call: the run stops there, resumable from its last generation)."""

    def __init__(self, unet, generations: int, node_id=None):
        super().__init__(progress=self._generation, stop=comfy.model_management.processing_interrupted)
        self.bar = comfy.utils.ProgressBar(generations, node_id=node_id)
        self.done, self.calls, self.per_generation = 0, 0, None
        self.handle = unet.register_forward_pre_hook(self._unet_call)

    def _unet_call(self, module, args):
        if comfy.model_management.processing_interrupted():
            raise StopRun
        self.calls += 1
        if self.per_generation:
            self.bar.update_absolute(self.done + min(0.99, self.calls / self.per_generation))

    def _generation(self, done: int, total: int) -> None:
        self.per_generation = self.per_generation or self.calls  # (the first generation's count, validation included)
        self.done, self.calls = done, 0
        self.bar.update_absolute(done, total)

    def close(self) -> None:
        self.handle.remove()
