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
    ``tokenizer_2`` / ``text_encoder_2``: SDXL's second encoder (OpenCLIP bigG with its
    projection, whose pooled output conditions the UNet too); ``zero_empty_negative``: the
    pipeline's ``force_zeros_for_empty_prompt`` (an empty negative prompt is all zeros).
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
    zero_empty_negative: bool = False
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
        """Width of the conditioning sequence (SDXL: both encoders' widths, concatenated)."""
        return sum(int(te.config.hidden_size) for te in self.text_encoders)

    @property
    def text_encoders(self) -> list:
        """The text encoders in conditioning order (SDXL: ViT-L's, then bigG's)."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    @property
    def tokenizers(self) -> list:
        """The tokenizers, one per text encoder."""
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a UNet conditioned on pooled text and size ids (``text_time``)."""
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        """``SDXL``, ``SD 2.x`` (v-prediction or 1024-wide text) or ``SD 1.x``."""
        if self.is_sdxl:
            return "SDXL"
        v = self.scheduler_config.get("prediction_type") == "v_prediction"
        return "SD 2.x" if v or int(self.text_encoder.config.hidden_size) == 1024 else "SD 1.x"

    def towers(self) -> list[str]:
        """The image towers present and the part of the conditioning their projection matches."""
        if self.clip is None:
            return []
        width = int(self.clip.visual_projection.out_features)
        widths = [int(te.config.hidden_size) for te in self.text_encoders]
        where = [f"encoder {i + 1}" for i, w in enumerate(widths) if w == width] if self.is_sdxl else \
            (["the prompt"] if width == widths[0] else [])
        return [f"CLIP image tower, projection {width} -> {where[0] if where else 'no text encoder (unusable)'}"]

    def describe(self) -> str:
        """One line: family, native size, prediction type, text widths, image towers."""
        widths = str(self.text_encoder.config.hidden_size)
        if self.is_sdxl:
            pooled = self.text_encoder_2.config.projection_dim
            widths += f" + {self.text_encoder_2.config.hidden_size} (pooled {pooled})"
        towers = "; ".join(self.towers()) or "none (pass --clip for image guidance and the CLIP loss)"
        prediction = self.scheduler_config.get("prediction_type", "epsilon")
        return (f"{self.family}, native {self.default_size}px, {prediction} prediction, text {widths}, "
                f"image towers: {towers}")

    def scheduler(self, name: str):
        return make_scheduler(name, self.scheduler_config)

    def to(self, device, dtype=None) -> Components:
        for m in (self.text_encoder, self.unet, self.vae, self.clip, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self
