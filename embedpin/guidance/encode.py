"""Encode prompts into the text encoder's output sequence and images into text-space tokens.

Prompts follow Stable Diffusion: token ids padded to ``tokenizer.model_max_length`` (77),
the CLIP text encoder's last hidden state after its final layer norm; ``clip_skip=k``
stops ``k`` layers early and applies the final layer norm, as AUTOMATIC1111 does. Longer
prompts are encoded in 77-position chunks and concatenated, and the written emphasis
weights the tokens (:mod:`embedpin.guidance.tokens`).
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
from embedpin.guidance.deltas import emphasis
from embedpin.guidance.tokens import token_label, tokenize
from embedpin.models.clip import clip_pixels


@dataclass
class PromptEncoding:
    """One tokenized and encoded prompt (:mod:`embedpin.guidance.tokens`: c chunks of 77).

    ids: [1, L] long (L = 77 c); input_embeds: [1, L, Din] token embeddings (no positions);
    raw: [1, L, D] the encoder's states; hidden: the conditioning sequence, ``raw`` with the
    written emphasis applied (:func:`~embedpin.guidance.deltas.emphasis`; the same tensor
    when every weight is 1); positions [n] / weights [n]: the prompt's tokens' (placeholders
    included) sequence positions and written weights; placeholders [N]: the placeholders'
    positions; token_strings: the L token strings (for reports); window: positions per
    chunk. SDXL: input_embeds are both encoders' token embeddings side by side
    [1, L, Din1 + Din2] (a placeholder token has one vector per encoder), ids_2 [1, L] the
    second tokenizer's ids, pooled [1, P] (the first chunk's).
    """

    ids: torch.Tensor
    input_embeds: torch.Tensor
    hidden: torch.Tensor
    token_strings: list[str]
    positions: torch.Tensor
    weights: torch.Tensor
    placeholders: torch.Tensor
    window: int
    raw: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    ids_2: torch.Tensor | None = None

    def __post_init__(self):
        if self.raw is None:
            self.raw = self.hidden

    @property
    def n_tokens(self) -> int:
        """Prompt tokens (placeholders included), all chunks."""
        return len(self.positions)

    @property
    def chunks(self) -> int:
        return self.ids.shape[1] // self.window

    @property
    def labels(self) -> list[str]:
        """Each weight's token as a person reads it (:func:`~embedpin.guidance.tokens.token_label`)."""
        return [token_label(self.token_strings[p]) for p in self.positions.tolist()]

    @property
    def weighted(self) -> bool:
        """Whether the prompt has emphasis (some written weight is not 1)."""
        return bool((self.weights != 1).any())


def _in_chunks(x: torch.Tensor, window: int) -> torch.Tensor:
    """[λ, c·W, ...] -> [λ·c, W, ...]: each chunk its own row (encoded on its own)."""
    return x.reshape(-1, window, *x.shape[2:])


def _window(components) -> int:
    return int(components.tokenizer.model_max_length)


def encode_text_from_embeds(components, input_embeds: torch.Tensor, ids: torch.Tensor | None = None,
                            clip_skip: int = 0) -> torch.Tensor:
    """Run the text encoder from input token embeddings [λ, L, Din] -> hidden states [λ, L, D],
    every 77-position chunk on its own.

    The same computation as ``CLIPTextModel.forward`` (positions added, causal attention,
    final layer norm), which only takes ids; ``ids`` [1 or λ, L], when given, is checked
    against the sequence length. ``clip_skip`` layers are left out at the end.
    """
    te = components.text_encoder
    _check_skip(te, clip_skip)
    if ids is not None and ids.shape[-1] != input_embeds.shape[1]:
        raise ValueError(f"ids length {ids.shape[-1]} != input_embeds length {input_embeds.shape[1]}")
    chunks = _in_chunks(input_embeds, _window(components))
    out = te.final_layer_norm(_layers(te, chunks, len(te.encoder.layers) - clip_skip)[-1])
    return out.reshape(input_embeds.shape[0], -1, out.shape[-1])


def _check_skip(text_model, clip_skip: int) -> None:
    top = len(text_model.encoder.layers) - 1
    if not 0 <= clip_skip <= top:
        raise ConfigError(f"clip_skip must be in [0, {top}], got {clip_skip}")


def _layers(text_model, input_embeds: torch.Tensor, n: int) -> list[torch.Tensor]:
    """A ``CLIPTextModel``'s hidden states after 0..n layers, from input embeddings [λ, L, Din]:
    positions added, causal attention (``CLIPTextModel.forward``, which only takes ids), in the
    encoder's dtype."""
    h = text_model.embeddings(inputs_embeds=input_embeds.to(text_model.final_layer_norm.weight.dtype))
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
    side by side [.., L, Din1 + Din2]). Ids after the vocabulary (placeholders) look up
    row 0: their rows are replaced by the placeholders' vectors."""
    tables = [te.get_input_embeddings() for te in components.text_encoders]
    ids_all = [ids] + ([ids if ids_2 is None else ids_2] if components.is_sdxl else [])
    return torch.cat([t(i.masked_fill(i >= t.num_embeddings, 0)).float() for t, i in zip(tables, ids_all)], -1)


def encode_from_embeds(components, input_embeds: torch.Tensor, ids: torch.Tensor, ids_2: torch.Tensor | None = None,
                       clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sequence [λ, L, D], pooled [λ, P] or None), float32, from input embeddings [λ, L, Din],
    for either family (:func:`encode_text_from_embeds`, :func:`encode_sdxl_from_embeds`): the
    encoders run in the model's dtype, the guidance that follows works in float32."""
    if components.is_sdxl:
        sequence, pooled = encode_sdxl_from_embeds(components, input_embeds, ids_2, clip_skip)
        return sequence.float(), pooled.float()
    return encode_text_from_embeds(components, input_embeds, ids, clip_skip).float(), None


def encode_sdxl_from_embeds(components, input_embeds: torch.Tensor, ids_2: torch.Tensor,
                            clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning from both encoders' token embeddings side by side [λ, L, D1 + D2]:
    (sequence [λ, L, D1 + D2], pooled [λ, P]). Each encoder's hidden state ``clip_skip``
    layers below its penultimate one, concatenated; pooled: the second encoder's final
    layer-normed state at the EOS of ``ids_2`` [1 or λ, L], projected."""
    te1, te2 = components.text_encoder, components.text_encoder_2.text_model
    for te in (te1, te2):
        _check_skip(te, clip_skip)
    d1, window, lam = input_widths(components)[0], _window(components), input_embeds.shape[0]
    chunks = _in_chunks(input_embeds, window)
    first = _layers(te1, chunks[..., :d1], len(te1.encoder.layers) - 1 - clip_skip)[-1]
    states = _layers(te2, chunks[..., d1:], len(te2.encoder.layers))
    final = te2.final_layer_norm(states[-1]).unflatten(0, (lam, -1))[:, 0]  # the first chunk's: pooled there
    rows = torch.arange(lam, device=final.device)
    pooled = components.text_encoder_2.text_projection(final[rows, eos_positions(te2, ids_2[:, :window].expand(lam, -1))])
    sequence = torch.cat([first, states[-2 - clip_skip]], dim=-1)
    return sequence.reshape(lam, -1, sequence.shape[-1]), pooled


@functools.cache
def _cache_arg() -> str:
    """``create_causal_mask``'s cache argument: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (deprecated, warns)."""
    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@torch.no_grad()
def encode_prompt(components, prompt: str, clip_skip: int = 0, placeholders: torch.Tensor | None = None,
                  chunks: int | None = None, omit: int | None = None, first: bool = False) -> PromptEncoding:
    """Tokenize (:func:`~embedpin.guidance.tokens.tokenize`: emphasis, 75-token chunks) and
    encode ``prompt`` -> :class:`PromptEncoding` ([1, 77 c, D]; SDXL: [1, 77 c, 2048] and
    pooled [1, 1280]), with ``placeholders`` [N, Din] after it (token vectors) and at least
    ``chunks`` chunks (empty ones pad it, as they pad the shorter of prompt and negative);
    ``omit``: the index of a prompt token to leave out; ``first``: the placeholders stand before
    the prompt's words (``"<pin> <prompt>"``), where the causal encoder lets them change every
    word's state."""
    t = tokenize(components, prompt, 0 if placeholders is None else len(placeholders), chunks, omit, first)
    embeds = token_embeddings(components, t.ids, t.ids_2)
    if placeholders is not None:
        embeds[:, t.placeholders] = placeholders.to(embeds)
    raw, pooled = encode_from_embeds(components, embeds, t.ids, t.ids_2, clip_skip)
    weights = t.weights.to(raw)
    hidden = emphasis(raw, weights[None], t.positions) if bool((weights != 1).any()) else raw
    return PromptEncoding(ids=t.ids, input_embeds=embeds, hidden=hidden, token_strings=t.strings,
                          positions=t.positions, weights=weights, placeholders=t.placeholders, window=t.window,
                          raw=raw, pooled=pooled, ids_2=t.ids_2)


@torch.no_grad()
def encode_negative(components, negative: str, clip_skip: int = 0, chunks: int | None = None) -> PromptEncoding:
    """The negative prompt's encoding (at least ``chunks`` chunks); on a pipeline that zeroes
    empty negatives (SDXL's ``force_zeros_for_empty_prompt``) an empty one is all zeros,
    sequence and pooled."""
    enc = encode_prompt(components, negative, clip_skip, chunks=chunks)
    if components.zero_empty_negative and not negative.strip():
        enc.hidden = enc.raw = torch.zeros_like(enc.hidden)
        enc.pooled = None if enc.pooled is None else torch.zeros_like(enc.pooled)
    return enc


@torch.no_grad()
def encode_image(components, image: torch.Tensor, tower=None) -> torch.Tensor:
    """CLIP image tokens in text space: [n, 3, H, W] in [0, 1] -> [n, P, Dp] (P = 1 + patches),
    with ``tower`` (default: the model's first image tower).

    FlexDiffuse's image embedding: vision hidden states -> post_layernorm -> visual_projection
    applied to every token, not only the pooled CLS token. Preprocessing is the CLIP loss's
    (shorter side resized, centre crop, mean/std), so guide and renders are seen alike.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise InputError(f"guide image must be [n, 3, H, W] RGB, got shape {tuple(image.shape)}")
    tower = tower or components.tower
    guide_part(components, tower)
    param = next(tower.model.parameters())
    return image_tokens(tower.model, clip_pixels(tower, image.to(param.device)).to(param.dtype))


def guide_part(components, tower=None) -> slice:
    """The features of the conditioning sequence that ``tower``'s image tokens map onto (default:
    the first tower): all of them (SD 1.x / 2.x), or on SDXL the encoder whose width the
    tower's projection matches (CLIP ViT-L/14 -> the first, 768; a ViT-bigG tower -> the
    second, 1280)."""
    tower = tower or components.tower
    if tower is None:
        raise ModelError(f"model {components.name!r} has no CLIP image encoder; image guidance needs one "
                         "(pass --clip)")
    width, widths = tower.width, input_widths(components)
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
