"""The loaded model parts every stage needs, in one small dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from embedpin.errors import ConfigError
from embedpin.models.checkpoint import prediction_name
from embedpin.models.schedulers import SCHEDULER_CLASSES, check_scheduler


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler of the named kind, built from a model's scheduler config."""
    import diffusers  # here, not at the top: the loader imports diffusers first (models.loader)

    cls_name, overrides = SCHEDULER_CLASSES[check_scheduler(name)]
    cls = getattr(diffusers, cls_name)
    try:
        return cls.from_config({**config, **overrides})
    except ImportError as e:  # DPMSolverSDEScheduler needs torchsde
        raise ConfigError(f"scheduler {name!r} needs an extra package: {e}") from None


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTower:
    """An image-capable ``transformers.CLIPModel`` and its preprocessing (input size,
    normalisation mean / std). Its projection width decides which text features its image
    tokens can map onto (:func:`embedpin.guidance.encode.guide_part`)."""

    model: Any
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def width(self) -> int:
        return int(self.model.visual_projection.out_features)


@dataclass
class Components:
    """Tokenizer, text encoder, UNet, VAE, scheduler config and image-capable CLIP towers.

    ``towers``: the image towers (``--clip``, or the model's own ``clip/``), each mapping guide
    images onto the part of the conditioning its projection matches (SDXL: ViT-L/14 onto the
    first encoder's 768 features, a ViT-bigG tower onto the second's 1280); the first one also
    embeds renders for the CLIP loss and ranks init words (:attr:`clip`). It may be empty for a
    model with no image encoder available, and stages that need one say so.
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
    towers: tuple[ImageTower, ...] = ()
    tokenizer_2: Any | None = None
    text_encoder_2: Any | None = None
    zero_empty_negative: bool = False
    source: str = ""
    config_note: str = ""  # single-file checkpoints: which configs they loaded with, and why

    @property
    def tower(self) -> ImageTower | None:
        """The first image tower (the CLIP loss's and init-word ranking's), or None."""
        return self.towers[0] if self.towers else None

    @property
    def clip(self):
        """The first image tower's ``CLIPModel``, or None."""
        return self.towers[0].model if self.towers else None

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
    def profile(self) -> str:
        """Whose defaults the run takes (``embedpin.config.MODEL_DEFAULTS``): the built-in
        model's, or its family's."""
        return "micro" if self.name == "micro" else self.family

    @property
    def family(self) -> str:
        """``SDXL``, ``SD 2.x`` (v-prediction or 1024-wide text) or ``SD 1.x``."""
        if self.is_sdxl:
            return "SDXL"
        v = self.scheduler_config.get("prediction_type") == "v_prediction"
        return "SD 2.x" if v or int(self.text_encoder.config.hidden_size) == 1024 else "SD 1.x"

    def tower_lines(self) -> list[str]:
        """Each image tower and the part of the conditioning its projection matches."""
        widths = [int(te.config.hidden_size) for te in self.text_encoders]
        lines = []
        for t in self.towers:
            where = [f"encoder {i + 1}" for i, w in enumerate(widths) if w == t.width] if self.is_sdxl else \
                (["the prompt"] if t.width == widths[0] else [])
            lines.append(f"CLIP image tower, projection {t.width} -> "
                         f"{where[0] if where else 'no text encoder (unusable for guidance)'}")
        return lines

    def describe(self) -> str:
        """One line: family, native size, prediction type, text widths, image towers."""
        widths = str(self.text_encoder.config.hidden_size)
        if self.is_sdxl:
            pooled = self.text_encoder_2.config.projection_dim
            widths += f" + {self.text_encoder_2.config.hidden_size} (pooled {pooled})"
        towers = "; ".join(self.tower_lines()) or "none (pass --clip for image guidance and the CLIP loss)"
        prediction = prediction_name(self.scheduler_config.get("prediction_type", "epsilon"))
        return (f"{self.family}, native {self.default_size}px, {prediction}, text {widths}, "
                f"image towers: {towers}")

    def scheduler(self, name: str):
        return make_scheduler(name, self.scheduler_config)

    def to(self, device, dtype=None) -> Components:
        """Move every model to ``device``; the diffusion models and text encoders also to
        ``dtype``. Image towers stay float32 (the CLIP loss and the guide's tokens keep their
        precision), as does a VAE whose config asks for it (``force_upcast``: SDXL's VAE
        overflows in float16)."""
        for m in (self.text_encoder, self.unet, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        upcast = dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        self.vae.to(device=device, dtype=torch.float32 if upcast else dtype)
        for t in self.towers:
            t.model.to(device=device, dtype=torch.float32)
        return self
