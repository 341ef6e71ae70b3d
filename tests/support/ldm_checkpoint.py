"""Write a diffusers pipeline as a single-file checkpoint in the original (LDM / SGM) layout,
the file A1111 and ComfyUI users have: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (SD 1.x's CLIP ViT-L) or
SDXL's ``conditioner.embedders.0.transformer.*`` (ViT-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG: fused q/k/v, transposed projection); SD 2.x's OpenCLIP ViT-H under
``cond_stage_model.model.*`` with one more block than the diffusers encoder (SD 2.x conditions on
the penultimate layer, so the original checkpoints carry a last block the model does not use).
Test-only: it writes the single files the tests load, without a download."""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if rest.startswith("to_out.0."):
        head, tail = "to_out.0", rest[len("to_out.0."):]
    return f"{table.get(head, head)}.{tail}"


def unet_key(key: str, per_block: int, up_attention: list[bool]) -> str:
    """A diffusers UNet2DConditionModel key -> its LDM ``model.diffusion_model`` key."""
    n = per_block + 1
    for new, old in UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{n * b + j + 1}." + (f"0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{n * b + j}." + (f"0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        return f"output_blocks.{n * b + per_block}.{2 if up_attention[b] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, n_up: int) -> tuple[str, bool]:
    """A diffusers AutoencoderKL key -> (its LDM ``first_stage_model`` key, whether it is an
    attention projection stored as a 1x1 convolution there)."""
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}", True
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", key)
    return key.replace("conv_shortcut", "nin_shortcut"), False


def open_clip_state(text_encoder, extra_block: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP text model in OpenCLIP's layout (q/k/v fused into in_proj; the projection transposed,
    an identity for a model without one); ``extra_block``: the last block once more, as the
    unused last block of SD 2.x's tower."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    width = text_encoder.config.hidden_size
    projection = sd.pop("text_projection.weight", torch.eye(width, dtype=sd["final_layer_norm.weight"].dtype))
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": projection.T.contiguous()}
    layers = text_encoder.config.num_hidden_layers
    if extra_block:
        last = f"encoder.layers.{layers - 1}."
        sd.update({f"encoder.layers.{layers}." + k[len(last):]: v.clone() for k, v in sd.items() if k.startswith(last)})
        layers += 1
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{part}"] = torch.cat(
                [sd.pop(f"{p}self_attn.{x}_proj.{part}") for x in "qkv"])
            out[f"transformer.resblocks.{i}.attn.out_proj.{part}"] = sd.pop(f"{p}self_attn.out_proj.{part}")
            out[f"transformer.resblocks.{i}.ln_1.{part}"] = sd.pop(f"{p}layer_norm1.{part}")
            out[f"transformer.resblocks.{i}.ln_2.{part}"] = sd.pop(f"{p}layer_norm2.{part}")
            out[f"transformer.resblocks.{i}.mlp.c_fc.{part}"] = sd.pop(f"{p}mlp.fc1.{part}")
            out[f"transformer.resblocks.{i}.mlp.c_proj.{part}"] = sd.pop(f"{p}mlp.fc2.{part}")
    sd.pop("embeddings.position_ids", None)
    if sd:
        raise KeyError(f"unconverted text-encoder keys: {sorted(sd)[:4]}")
    return out


def ldm_state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SD 1.x / 2.x (one CLIP text encoder) or SDXL pipeline, LDM-named."""
    cfg = pipe.unet.config
    up_attention = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {f"model.diffusion_model.{unet_key(k, cfg.layers_per_block, up_attention)}": v
           for k, v in pipe.unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        name, conv = vae_key(k, len(pipe.vae.config.up_block_types))
        out[f"first_stage_model.{name}"] = v[..., None, None] if conv and v.dim() == 2 else v
    clip_l = {("text_model." + k if not k.startswith("text_model.") else k): v
              for k, v in pipe.text_encoder.state_dict().items()}
    if getattr(pipe, "text_encoder_2", None) is None and pipe.text_encoder.config.hidden_size == 1024:  # SD 2.x
        out.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_state(pipe.text_encoder, True).items()})
    elif getattr(pipe, "text_encoder_2", None) is None:
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_l.items()})
    else:
        out.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.items()})
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(pipe.text_encoder_2).items()})
    return out


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """The pipeline's weights as one original-layout ``.safetensors`` checkpoint (in ``dtype``:
    checkpoints are shared in float16)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in ldm_state(pipe).items()}, str(path),
              metadata=metadata)
    return Path(path)
