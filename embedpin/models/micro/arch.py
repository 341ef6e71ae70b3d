"""Architectures of the micro model: a tiny CLIP, a tiny AutoencoderKL and a tiny UNet.

The same builders make randomly initialised stand-ins (``scale`` < 1) that tests use
when they need a model of the right family but not a trained one.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from embedpin.models.components import Components, ImageTower
from embedpin.models.micro.dataset import vocabulary
from embedpin.models.micro.tokenizer import save_tokenizer

TEXT_DIM = 64  # CLIP text hidden size == projection dim, as SD 1.x's ViT-L/14 has
IMAGE_SIZE = 64


def clip_config(tokenizer, layers: int = 3, vision_dim: int = 64):
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=TEXT_DIM * 4,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_DIM,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_dim, intermediate_size=vision_dim * 4, num_hidden_layers=layers,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8, projection_dim=TEXT_DIM,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_DIM)


def vae_config(scale: float = 1.0) -> dict:
    c = lambda n: max(8, int(n * scale))  # noqa: E731
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(c(32), c(64), c(64)), layers_per_block=1, norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def unet_config(scale: float = 1.0) -> dict:
    c = lambda n: max(8, int(n * scale))  # noqa: E731
    return dict(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(c(64), c(96), c(128)), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=TEXT_DIM, attention_head_dim=8,
    )


def scheduler_config() -> dict:
    return dict(
        _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon", timestep_spacing="leading",
    )


def random_components(seed: int = 0, scale: float = 0.5, name: str = "random-micro"):
    """Untrained components of the micro family (for tests that need shapes, not quality)."""
    torch.manual_seed(seed)  # model init only; library code never seeds globals elsewhere
    with tempfile.TemporaryDirectory() as d:
        tok = save_tokenizer(vocabulary(), d)
    clip = CLIPModel(clip_config(tok, layers=2)).eval()
    text = CLIPTextModel(clip.config.text_config).eval()
    text.load_state_dict(clip.text_model.state_dict())
    vae = AutoencoderKL(**vae_config(scale)).eval()
    unet = UNet2DConditionModel(**unet_config(scale)).eval()
    return Components(name=name, tokenizer=tok, text_encoder=text, unet=unet, vae=vae,
                      scheduler_config=scheduler_config(), towers=(ImageTower(clip, IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3),),
                      source="random")
