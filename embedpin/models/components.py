"""The loaded model parts every stage needs, in one small dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from embedpin.errors import ConfigError
from embedpin.models.schedulers import SCHEDULERS, check_scheduler


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler of the named kind, built from a model's scheduler config."""
    import diffusers  # here, not at the top: the loader imports diffusers first (models.loader)

    cls_name, overrides = SCHEDULERS[check_scheduler(name)]
    cls = getattr(diffusers, cls_name)
    try:
        return cls.from_config({**config, **overrides})
    except ImportError as e:  # DPMSolverSDEScheduler needs torchsde
        raise ConfigError(f"scheduler {name!r} needs an extra package: {e}") from None


@dataclass
class Components:
    """Tokenizer, text encoder, UNet, VAE, scheduler config and an image-capable CLIP.

    ``clip`` is a ``transformers.CLIPModel`` whose image tower embeds guide images and
    renders (for image guidance and the CLIP loss); it may be ``None`` for a model with
    no image encoder available, and stages that need it say so.
    ``tokenizer_2`` / ``text_encoder_2`` are reserved for SDXL's second encoder.
    """

    name: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    clip: Any | None
    clip_image_size: int = 224
    clip_image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    clip_image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    tokenizer_2: Any | None = None
    text_encoder_2: Any | None = None
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def scheduler(self, name: str):
        return make_scheduler(name, self.scheduler_config)

    def to(self, device, dtype=None) -> Components:
        for m in (self.text_encoder, self.unet, self.vae, self.clip, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self
