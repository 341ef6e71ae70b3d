"""Encode prompts into the text encoder's output sequence and images into text-space tokens.

Prompts follow Stable Diffusion: token ids padded to ``tokenizer.model_max_length`` (77),
the CLIP text encoder's last hidden state after its final layer norm; ``clip_skip=k``
stops ``k`` layers early and applies the final layer norm, as AUTOMATIC1111 does.
Images follow FlexDiffuse: every CLIP vision token (CLS + patches) after the vision
tower's post-layernorm and visual projection, i.e. in the space of CLIP text features.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask

from embedpin.errors import ConfigError, InputError, ModelError
from embedpin.models.clip import clip_pixels


@dataclass
class PromptEncoding:
    """One tokenized and encoded prompt.

    ids: [1, L] long; input_embeds: [1, L, Din] token embeddings (no positions);
    hidden: [1, L, D] conditioning sequence; n_tokens: prompt tokens between BOS and EOS;
    token_strings: the L token strings (for reports).
    """

    ids: torch.Tensor
    input_embeds: torch.Tensor
    hidden: torch.Tensor
    n_tokens: int
    token_strings: list[str]


def tokenize(components, prompt: str) -> tuple[torch.Tensor, int]:
    """Token ids [1, L] padded to the model's max length, and the number of prompt tokens."""
    tok = components.tokenizer
    length = int(tok.model_max_length)
    ids = tok(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    n_tokens = len(tok(prompt, truncation=True, max_length=length).input_ids) - 2
    return ids.to(components.text_encoder.device), n_tokens


@torch.no_grad()
def encode_text_from_embeds(components, input_embeds: torch.Tensor, ids: torch.Tensor | None = None,
                            clip_skip: int = 0) -> torch.Tensor:
    """Run the text encoder from input token embeddings [λ, L, Din] -> hidden states [λ, L, D].

    The same computation as ``CLIPTextModel.forward`` (positions added, causal attention,
    final layer norm), which only accepts ids; ``ids`` [1 or λ, L], when given, is checked
    against the sequence length. ``clip_skip`` layers are left out at the end.
    """
    te = components.text_encoder
    layers = te.encoder.layers
    if not 0 <= clip_skip < len(layers):
        raise ConfigError(f"clip_skip must be in [0, {len(layers) - 1}], got {clip_skip}")
    if ids is not None and ids.shape[-1] != input_embeds.shape[1]:
        raise ValueError(f"ids length {ids.shape[-1]} != input_embeds length {input_embeds.shape[1]}")
    h = te.embeddings(inputs_embeds=input_embeds)
    mask = create_causal_mask(config=te.config, inputs_embeds=h, attention_mask=None, **{_cache_arg(): None})
    for layer in layers[: len(layers) - clip_skip]:
        h = layer(h, mask, is_causal=True)
    return te.final_layer_norm(h)


@functools.cache
def _cache_arg() -> str:
    """``create_causal_mask``'s cache argument: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (deprecated, warns)."""
    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@torch.no_grad()
def encode_prompt(components, prompt: str, clip_skip: int = 0) -> PromptEncoding:
    """Tokenize and encode ``prompt`` -> :class:`PromptEncoding` ([1, 77, D] for SD)."""
    ids, n_tokens = tokenize(components, prompt)
    embeds = components.text_encoder.embeddings.token_embedding(ids)
    hidden = encode_text_from_embeds(components, embeds, ids, clip_skip)
    strings = components.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return PromptEncoding(ids=ids, input_embeds=embeds, hidden=hidden, n_tokens=n_tokens, token_strings=strings)


@torch.no_grad()
def encode_image(components, image: torch.Tensor) -> torch.Tensor:
    """CLIP image tokens in text space: [n, 3, H, W] in [0, 1] -> [n, P, D] (P = 1 + patches).

    FlexDiffuse's image embedding: vision hidden states -> post_layernorm -> visual_projection
    applied to every token, not only the pooled CLS token. Preprocessing is the CLIP loss's
    (shorter side resized, centre crop, mean/std), so guide and renders are seen alike.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise InputError(f"guide image must be [n, 3, H, W] RGB, got shape {tuple(image.shape)}")
    clip = components.clip
    if clip is None:
        raise ModelError(f"model {components.name!r} has no CLIP image encoder; image guidance needs one")
    proj = clip.visual_projection
    if proj.out_features != components.text_dim:
        raise ModelError(f"CLIP projection dim {proj.out_features} != text encoder dim {components.text_dim}; "
                         "image tokens cannot be mapped onto this model's prompts")
    param = next(clip.parameters())
    return image_tokens(clip, clip_pixels(components, image.to(param.device)).to(param.dtype))


def image_tokens(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """Every vision token (CLS + patches) -> post_layernorm -> visual_projection:
    CLIP pixel_values [n, 3, S, S] -> [n, P, D]."""
    hidden = clip.vision_model(pixel_values=pixel_values).last_hidden_state
    return clip.visual_projection(clip.vision_model.post_layernorm(hidden))
