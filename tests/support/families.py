"""Tiny random-weight pipelines of each model family, built from configs (no hub), with the
micro tokenizer: SD 1.x (epsilon prediction, 768-style single encoder), SD 2.x (v-prediction,
linear-projection attention, the SD 2.1 scheduler config) and SDXL (``sdxl_model``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from support.sdxl_model import build_sdxl_pipeline, text_config

SIZE = 32  # native pixels; the VAE downsamples by 2, the UNet by 2 more: sides in multiples of 4
FAMILIES = ("SD 1.x", "SD 2.x", "SDXL")


def _unet(cross: int, v2: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if v2 else 8, use_linear_projection=v2, cross_attention_dim=cross,
        norm_num_groups=8)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=SIZE)


def build_pipeline(family: str, seed: int = 0):
    """The family's diffusers pipeline with random weights, fp32 on the CPU."""
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from embedpin.models.micro.dataset import vocabulary
    from embedpin.models.micro.tokenizer import save_tokenizer

    if family == "SDXL":
        return build_sdxl_pipeline(seed)
    v2 = family == "SD 2.x"
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # weight init of a test fixture
    with tempfile.TemporaryDirectory() as d:
        tok = save_tokenizer(vocabulary(), Path(d))
    width = 48 if v2 else 32
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  set_alpha_to_one=False)
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **common) if v2 else \
        PNDMScheduler(skip_prk_steps=True, **common)  # SD 2.1's and SD 1.5's published scheduler configs
    pipe = StableDiffusionPipeline(vae=_vae().eval(), text_encoder=CLIPTextModel(text_config(tok, width)).eval(),
                                   tokenizer=tok, unet=_unet(width, v2).eval(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    torch.random.set_rng_state(state)
    return pipe.to(torch.float32)


def save_family(folder: str | Path, family: str, seed: int = 0) -> Path:
    """The family's tiny pipeline as a diffusers folder (what ``--model`` takes)."""
    build_pipeline(family, seed).save_pretrained(Path(folder), safe_serialization=True)
    return Path(folder)
