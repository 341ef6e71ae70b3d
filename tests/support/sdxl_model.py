"""A tiny random-weight SDXL pipeline built from configs (no hub): two CLIP text encoders of
different widths (the second with its projection), a ``text_time`` UNet conditioned on
their concatenation, the pooled embedding and the size ids, and the micro tokenizer twice."""

from __future__ import annotations

import tempfile
from pathlib import Path

W1, W2, TIME_DIM = 32, 48, 8
SIZE = 32  # pixels; the VAE downsamples by 2


def text_config(tok, width: int, layers: int = 3):
    """As the published SD / SDXL text encoders are configured: the legacy ``eos_token_id`` 2
    (transformers then pools at the highest id, the EOS of a plain prompt)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1, projection_dim=width, hidden_act="gelu")


def build_sdxl_pipeline(seed: int = 0, force_zeros: bool = True):
    """``StableDiffusionXLPipeline`` with random weights, fp32 on the CPU."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from embedpin.models.micro.dataset import vocabulary
    from embedpin.models.micro.tokenizer import save_tokenizer

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # weight init of a test fixture
    with tempfile.TemporaryDirectory() as d:
        tok, tok_2 = save_tokenizer(vocabulary(), Path(d) / "a"), save_tokenizer(vocabulary(), Path(d) / "b")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_DIM + W2, cross_attention_dim=W1 + W2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=SIZE)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(text_config(tok, W1)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(tok_2, W2)).eval(), tokenizer=tok,
        tokenizer_2=tok_2, unet=unet.eval(), scheduler=scheduler, force_zeros_for_empty_prompt=force_zeros)
    torch.random.set_rng_state(gen_state)
    return pipe.to(torch.float32)


def save_tower(folder: str | Path, width: int, seed: int = 1) -> Path:
    """A random image CLIP whose projection has ``width`` (W1: ViT-L-like, W2: bigG-like)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from embedpin.models.micro.dataset import vocabulary
    from embedpin.models.micro.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory() as d:
        tok = save_tokenizer(vocabulary(), Path(d))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=8, projection_dim=width)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # weight init of a test fixture
    clip = CLIPModel(CLIPConfig(text_config=text_config(tok, width).to_dict(), vision_config=vision.to_dict(),
                                projection_dim=width))
    torch.random.set_rng_state(state)
    clip.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def save_sdxl_folder(folder: str | Path, seed: int = 0, force_zeros: bool = True, tower: int | None = None) -> Path:
    """The tiny pipeline as a diffusers folder (what ``--model`` takes); ``tower``: also an
    image CLIP under ``clip/`` whose projection has that width (W1: a ViT-L-like tower)."""
    folder = Path(folder)
    pipe = build_sdxl_pipeline(seed, force_zeros)
    pipe.save_pretrained(folder, safe_serialization=True)
    if tower is not None:
        save_tower(folder / "clip", tower, seed + 1)
    return folder
