"""Encode prompts into the text encoder's output sequence and images into text-space tokens.

Prompts follow Stable Diffusion: token ids padded to ``tokenizer.model_max_length`` (77),
the CLIP text encoder's last hidden state after its final layer norm; ``clip_skip=k``
stops ``k`` layers early and applies the final layer norm, as AUTOMATIC1111 does.
SDXL (Podell et al. 2023, sec. 2.1) conditions on both encoders' penultimate hidden states
(no final layer norm; ``clip_skip`` counted from there, as diffusers does), concatenated on
the feature axis (768 + 1280), and on the second encoder's pooled, projected EOS state
(``pooled`` [1, 1280]); an empty negative prompt is all zeros when the pipeline says so
(``force_zeros_for_empty_prompt``), as in diffusers and AUTOMATIC1111.
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
    token_strings: the L token strings (for reports). SDXL: input_embeds are both encoders'
    token embeddings side by side [1, L, Din1 + Din2] (a placeholder token has one vector
    per encoder), ids_2 [1, L] the second tokenizer's ids, pooled [1, P].
    """

    ids: torch.Tensor
    input_embeds: torch.Tensor
    hidden: torch.Tensor
    n_tokens: int
    token_strings: list[str]
    pooled: torch.Tensor | None = None
    ids_2: torch.Tensor | None = None


def tokenize(components, prompt: str, tokenizer=None) -> tuple[torch.Tensor, int]:
    """Token ids [1, L] padded to the model's max length, and the number of prompt tokens
    (``tokenizer``: another of the model's tokenizers, SDXL's second)."""
    tok = tokenizer or components.tokenizer
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
    _check_skip(te, clip_skip)
    if ids is not None and ids.shape[-1] != input_embeds.shape[1]:
        raise ValueError(f"ids length {ids.shape[-1]} != input_embeds length {input_embeds.shape[1]}")
    return te.final_layer_norm(_layers(te, input_embeds, len(te.encoder.layers) - clip_skip)[-1])


def _check_skip(text_model, clip_skip: int) -> None:
    top = len(text_model.encoder.layers) - 1
    if not 0 <= clip_skip <= top:
        raise ConfigError(f"clip_skip must be in [0, {top}], got {clip_skip}")


def _layers(text_model, input_embeds: torch.Tensor, n: int) -> list[torch.Tensor]:
    """A ``CLIPTextModel``'s hidden states after 0..n layers, from input embeddings [λ, L, Din]:
    positions added, causal attention (``CLIPTextModel.forward``, which only takes ids)."""
    h = text_model.embeddings(inputs_embeds=input_embeds)
    mask = create_causal_mask(config=text_model.config, inputs_embeds=h, attention_mask=None, **{_cache_arg(): None})
    states = [h]
    for layer in text_model.encoder.layers[:n]:
        h = layer(h, mask, is_causal=True)
        states.append(h)
    return states


def eos_positions(text_model, ids: torch.Tensor) -> torch.Tensor:
    """Where ``CLIPTextModel`` pools, per row of ids [λ, L]: the first EOS token (the highest
    id for configs with the legacy ``eos_token_id`` 2, as transformers does)."""
    if text_model.eos_token_id == 2:
        return ids.to(torch.int).argmax(-1)
    return (ids.to(torch.int) == text_model.eos_token_id).int().argmax(-1)


def input_widths(components) -> tuple[int, ...]:
    """Token-embedding widths of the model's encoders: (Din,) or SDXL's (Din1, Din2)."""
    return tuple(te.get_input_embeddings().embedding_dim for te in components.text_encoders)


def token_embeddings(components, ids: torch.Tensor, ids_2: torch.Tensor | None = None) -> torch.Tensor:
    """Input token embeddings [.., L, Din] of ids (SDXL: both encoders' of ids and ids_2,
    side by side [.., L, Din1 + Din2])."""
    first = components.text_encoder.get_input_embeddings()(ids)
    if not components.is_sdxl:
        return first
    return torch.cat([first, components.text_encoder_2.get_input_embeddings()(ids if ids_2 is None else ids_2)], -1)


def encode_from_embeds(components, input_embeds: torch.Tensor, ids: torch.Tensor, ids_2: torch.Tensor | None = None,
                       clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sequence [λ, L, D], pooled [λ, P] or None) from input embeddings [λ, L, Din], for
    either family (:func:`encode_text_from_embeds`, :func:`encode_sdxl_from_embeds`)."""
    if components.is_sdxl:
        return encode_sdxl_from_embeds(components, input_embeds, ids_2, clip_skip)
    return encode_text_from_embeds(components, input_embeds, ids, clip_skip), None


@torch.no_grad()
def encode_sdxl_from_embeds(components, input_embeds: torch.Tensor, ids_2: torch.Tensor,
                            clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning from both encoders' token embeddings side by side [λ, L, D1 + D2]:
    (sequence [λ, L, D1 + D2], pooled [λ, P]). Each encoder's hidden state ``clip_skip``
    layers below its penultimate one, concatenated; pooled: the second encoder's final
    layer-normed state at the EOS of ``ids_2`` [1 or λ, L], projected."""
    te1, te2 = components.text_encoder, components.text_encoder_2.text_model
    for te in (te1, te2):
        _check_skip(te, clip_skip)
    d1 = input_widths(components)[0]
    first = _layers(te1, input_embeds[..., :d1], len(te1.encoder.layers) - 1 - clip_skip)[-1]
    states = _layers(te2, input_embeds[..., d1:], len(te2.encoder.layers))
    final = te2.final_layer_norm(states[-1])
    rows = torch.arange(len(final), device=final.device)
    pooled = components.text_encoder_2.text_projection(final[rows, eos_positions(te2, ids_2.expand(len(final), -1))])
    return torch.cat([first, states[-2 - clip_skip]], dim=-1), pooled


@functools.cache
def _cache_arg() -> str:
    """``create_causal_mask``'s cache argument: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (deprecated, warns)."""
    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@torch.no_grad()
def encode_prompt(components, prompt: str, clip_skip: int = 0) -> PromptEncoding:
    """Tokenize and encode ``prompt`` -> :class:`PromptEncoding` ([1, 77, D] for SD 1.x,
    [1, 77, 2048] and pooled [1, 1280] for SDXL)."""
    ids, n_tokens = tokenize(components, prompt)
    ids_2 = tokenize(components, prompt, components.tokenizer_2)[0] if components.is_sdxl else None
    embeds = token_embeddings(components, ids, ids_2)
    hidden, pooled = encode_from_embeds(components, embeds, ids, ids_2, clip_skip)
    strings = components.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return PromptEncoding(ids=ids, input_embeds=embeds, hidden=hidden, n_tokens=n_tokens, token_strings=strings,
                          pooled=pooled, ids_2=ids_2)


@torch.no_grad()
def encode_negative(components, negative: str, clip_skip: int = 0) -> PromptEncoding:
    """The negative prompt's encoding; on a pipeline that zeroes empty negatives (SDXL's
    ``force_zeros_for_empty_prompt``) an empty one is all zeros, sequence and pooled."""
    enc = encode_prompt(components, negative, clip_skip)
    if components.zero_empty_negative and not negative.strip():
        enc.hidden = torch.zeros_like(enc.hidden)
        enc.pooled = None if enc.pooled is None else torch.zeros_like(enc.pooled)
    return enc


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
    guide_part(components)
    param = next(clip.parameters())
    return image_tokens(clip, clip_pixels(components, image.to(param.device)).to(param.dtype))


def guide_part(components) -> slice:
    """The features of the conditioning sequence that image tokens map onto: all of them
    (SD 1.x / 2.x), or on SDXL the encoder whose width the image tower's projection matches
    (CLIP ViT-L/14 -> the first, 768; a ViT-bigG tower -> the second, 1280)."""
    clip = components.clip
    if clip is None:
        raise ModelError(f"model {components.name!r} has no CLIP image encoder; image guidance needs one")
    width = int(clip.visual_projection.out_features)
    widths = input_widths(components)
    if not components.is_sdxl:
        if width != components.text_dim:
            raise ModelError(f"CLIP projection dim {width} != text encoder dim {components.text_dim}; "
                             "image tokens cannot be mapped onto this model's prompts")
        return slice(None)
    if width not in widths:
        raise ModelError(f"CLIP projection dim {width} matches neither SDXL text encoder ({widths[0]}, {widths[1]}); "
                         "image tokens cannot be mapped onto this model's prompts")
    start = 0 if width == widths[0] else widths[0]
    return slice(start, start + width)


def image_tokens(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """Every vision token (CLS + patches) -> post_layernorm -> visual_projection:
    CLIP pixel_values [n, 3, S, S] -> [n, P, D]."""
    hidden = clip.vision_model(pixel_values=pixel_values).last_hidden_state
    return clip.visual_projection(clip.vision_model.post_layernorm(hidden))
