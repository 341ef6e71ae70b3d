"""The guidance context: everything a run's candidates share, computed once per run.

Encodings of the prompt (with the token-vector placeholders, if any) and the negative
prompt, the guide images' tokens and their mapping onto the prompt, the cluster profile,
the concept mapping and the delta / token-vector bases (the last two on first use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from embedpin.config import OptimConfig, RenderConfig, SearchConfig
from embedpin.errors import ConfigError
from embedpin.guidance.blocks import blocks
from embedpin.guidance.concepts import ConceptMapping, map_concepts
from embedpin.guidance.deltas import (
    image_basis,
    pca_directions,
    random_orthonormal,
    random_sequence_basis,
    sequence_basis,
)
from embedpin.guidance.encode import (
    PromptEncoding,
    encode_from_embeds,
    encode_image,
    encode_negative,
    encode_prompt,
    guide_part,
)
from embedpin.guidance.images import ImageLike, as_image_batch
from embedpin.guidance.mapping import MODES, Mapping, map_image_tokens
from embedpin.guidance.tween import cluster_profile

if TYPE_CHECKING:
    from embedpin.models.components import Components

DELTA_BASES = ("image", "pca", "random")
VECTOR_BASES = ("pca", "random")


@dataclass(frozen=True)
class GuidanceOptions:
    """Knobs fixed for a run (not searched).

    mapping / reuse: see :mod:`embedpin.guidance.mapping`; clip_skip: layers skipped at the
    end of the text encoder; cluster_radius (positions) and softness (alignment units of the
    soft threshold steps): see :mod:`embedpin.guidance.tween`; concept_threshold: base-to-concept
    alignment a position needs to take a concept's image token; delta_basis: "image", "pca",
    "random" or None (image with a guide image, else pca) with delta_k elements; n_vectors
    placeholder tokens appended to the prompt (before EOS, as "<prompt> <pin>" would be
    written), initialised at init_word (comma-separated words: one per placeholder, in turn;
    a word's tokens' mean if it splits), in a vector_k-dim
    vector_basis ("pca" or "random"); seed for the random bases; cfg and strength: the values
    used when those blocks are not searched.
    """

    mapping: str = "alignment-first"
    reuse: bool = True
    clip_skip: int = 0
    cluster_radius: float = 4.0
    softness: float = 0.02
    concept_threshold: float = 0.75
    delta_basis: str | None = None
    delta_k: int = SearchConfig.rank  # (defaults: the run config's, held once in embedpin.config)
    n_vectors: int = 0
    vector_k: int = SearchConfig.rank
    vector_basis: str = SearchConfig.basis
    init_word: str = "<|endoftext|>"  # the CLIP tokenizers' padding: placeholders start at the plain prompt
    seed: int = OptimConfig.seed
    cfg: float = RenderConfig.cfg
    strength: float = RenderConfig.strength


@dataclass
class GuidanceContext:
    """Precomputed per-run guidance state; build with :func:`make_context`.

    plain: the prompt's encoding ([1, L, D] hidden), with the placeholders at the init word
    when ``options.n_vectors`` > 0: what every parameter at its default reproduces exactly.
    image_tokens [1, P, D], mapping, profile [1, L], concepts: None without a guide image.
    vector_init [N, Din] and vector_start (first placeholder position) when n_vectors > 0.
    """

    components: Components
    options: GuidanceOptions
    prompt: str
    plain: PromptEncoding
    negative: PromptEncoding
    image_tokens: torch.Tensor | None = None
    mapping: Mapping | None = None
    profile: torch.Tensor | None = None
    concepts: ConceptMapping | None = None
    init_image: torch.Tensor | None = None
    vector_init: torch.Tensor | None = None
    vector_start: int = 0
    part: slice = field(default_factory=lambda: slice(None))

    def on_part(self, text: torch.Tensor, fn) -> torch.Tensor:
        """``fn`` applied to the features image guidance acts on (:func:`guide_part`; all of
        them but on SDXL), the rest of text [λ|1, L, D] unchanged: [λ, L, D]."""
        if self.part == slice(None):
            return fn(text)
        inner = fn(text[..., self.part])
        outer = text.expand(inner.shape[0], -1, -1)
        return torch.cat([outer[..., :self.part.start], inner, outer[..., self.part.stop:]], dim=-1)

    @property
    def guidance_note(self) -> str | None:
        """Where image guidance acts when it is not the whole sequence (SDXL with one tower)."""
        if self.mapping is None or self.part == slice(None):
            return None
        width, which = self.part.stop - self.part.start, "first" if self.part.start == 0 else "second"
        return (f"image guidance acts on the {which} text encoder's part of the conditioning ({width} of "
                f"{self.plain.hidden.shape[-1]} features): the image tower's projection matches only that encoder")

    @property
    def length(self) -> int:
        return self.plain.hidden.shape[1]

    @cached_property
    def tables(self) -> list[torch.Tensor]:
        """Each text encoder's token-embedding table [V, Din_e] (SDXL: two)."""
        return [te.get_input_embeddings().weight.detach() for te in self.components.text_encoders]

    @cached_property
    def encoder_directions(self) -> list[torch.Tensor]:
        """Each table's principal directions [k, Din_e] (k = max of delta_k, vector_k)."""
        k = max(self.options.delta_k, self.options.vector_k)
        return [pca_directions(t, min(k, t.shape[-1])) for t in self.tables]

    @cached_property
    def table_directions(self) -> torch.Tensor:
        """Principal directions [k, Din] of the token-embedding space (SDXL: the two tables'
        in turn, each zero outside its encoder's part of the concatenated width)."""
        dirs = [_embed(d, i, self.tables) for i, d in enumerate(self.encoder_directions)]
        if len(dirs) == 1:
            return dirs[0]
        return torch.stack([dirs[j % 2][j // 2] for j in range(2 * min(len(d) for d in dirs))])

    @property
    def vector_rank(self) -> int:
        """Basis elements per token vector: vector_k per text encoder."""
        return self.options.vector_k * len(self.tables)

    @cached_property
    def delta_basis(self) -> torch.Tensor:
        """Conditioning-delta basis [K, L, D], orthogonal, each element with the plain sequence's norm."""
        o, h = self.options, self.plain.hidden
        kind = o.delta_basis or ("image" if self.mapping is not None else "pca")
        if kind == "image":
            if self.mapping is None:
                raise ConfigError("delta basis 'image' needs a guide image")
            part = h[..., self.part]
            unit = _embed_part(image_basis(part, self.mapping.tokens(part), o.delta_k), self.part, h.shape[-1])
        elif kind == "pca":
            unit = sequence_basis(self.table_directions[: o.delta_k], self.length)
        else:
            gen = torch.Generator().manual_seed(o.seed)
            unit = random_sequence_basis(o.delta_k, self.length, h.shape[-1], gen, h)
        return unit * h.norm()

    @cached_property
    def vector_basis(self) -> torch.Tensor:
        """Token-vector basis [vector_rank, Din]: vector_k orthonormal directions per encoder
        (SDXL: each in its encoder's part of the vector, zero in the other), each scaled by
        its table's mean row norm over :attr:`vector_scale`."""
        o, init = self.options, self.vector_init
        gen = torch.Generator().manual_seed(o.seed + 1)
        parts = []
        for i, table in enumerate(self.tables):
            if o.vector_basis == "pca":
                unit = self.encoder_directions[i][: o.vector_k]
            else:
                unit = random_orthonormal(o.vector_k, table.shape[-1], gen, init)
            parts.append(_embed(unit, i, self.tables) * (_row_norm(table) / self.vector_scale))
        return torch.cat(parts)

    @cached_property
    def vector_scale(self) -> float:
        """Token-vector step per unit coefficient: the mean norm of the (first) token-embedding
        table's rows."""
        return _row_norm(self.tables[0])

    def blocks(self, enabled: set[str] | Sequence[str]):
        """The search blocks for ``enabled`` names (see :mod:`embedpin.guidance.blocks`)."""
        return blocks(self, enabled)


def _row_norm(table: torch.Tensor) -> float:
    return float(table.norm(dim=-1).mean())


def _embed(rows: torch.Tensor, i: int, tables: list[torch.Tensor]) -> torch.Tensor:
    """Rows [k, Din_i] of encoder i placed in its part of the concatenated width [k, sum Din]."""
    widths = [t.shape[-1] for t in tables]
    before, after = sum(widths[:i]), sum(widths[i + 1:])
    return torch.nn.functional.pad(rows, (before, after))


def _embed_part(basis: torch.Tensor, part: slice, width: int) -> torch.Tensor:
    """Elements [K, L, Dp] on the features ``part`` of a width-``width`` sequence -> [K, L, width]."""
    if part == slice(None):
        return basis
    return torch.nn.functional.pad(basis, (part.start, width - part.stop))


def _check_options(o: GuidanceOptions, components) -> None:
    d = components.text_dim
    if o.mapping not in MODES:
        raise ConfigError(f"unknown mapping mode {o.mapping!r}; choose one of: {', '.join(MODES)}")
    if o.delta_basis is not None and o.delta_basis not in DELTA_BASES:
        raise ConfigError(f"unknown delta basis {o.delta_basis!r}; choose one of: {', '.join(DELTA_BASES)}")
    if o.vector_basis not in VECTOR_BASES:
        raise ConfigError(f"unknown token-vector basis {o.vector_basis!r}; choose one of: {', '.join(VECTOR_BASES)}")
    for name, k in (("delta_k", o.delta_k), ("vector_k", o.vector_k)):
        if not 1 <= k <= d:
            raise ConfigError(f"{name} must be in [1, {d}] for this model, got {k}")
    if o.n_vectors < 0:
        raise ConfigError(f"n_vectors must be >= 0, got {o.n_vectors}")
    if o.softness <= 0 or o.cluster_radius <= 0:
        raise ConfigError("softness and cluster_radius must be > 0")


def init_words(options: GuidanceOptions) -> list[str]:
    """The placeholders' init words: ``init_word`` split at commas, repeated to ``n_vectors``."""
    words = [w.strip() for w in options.init_word.split(",") if w.strip()]
    if not words:
        raise ConfigError(f"init word {options.init_word!r} names no word")
    return [words[i % len(words)] for i in range(options.n_vectors)]


def _word_vector(components, word: str, device) -> tuple[torch.Tensor, int, int]:
    """An init word's input embedding [Din] (the mean of its tokens' if it splits; SDXL: each
    encoder's, side by side) and its first token id in each tokenizer."""
    ids = [tok(word, add_special_tokens=False).input_ids for tok in components.tokenizers]
    if not all(ids):
        raise ConfigError(f"init word {word!r} has no tokens")
    parts = [te.get_input_embeddings()(torch.tensor(i, device=device)).mean(0)
             for te, i in zip(components.text_encoders, ids)]
    return torch.cat(parts), ids[0][0], ids[-1][0]


def _insert(seq: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """seq [1, L, ...] with rows [1, n, ...] inserted at ``start``, cut back to length L."""
    return torch.cat([seq[:, :start], rows, seq[:, start:seq.shape[1] - rows.shape[1]]], dim=1)


def _with_placeholders(components, enc: PromptEncoding, options: GuidanceOptions):
    """Append ``n_vectors`` placeholder tokens (each at its init word's embedding: the mean of
    the word's tokens if it splits) after the prompt."""
    n = options.n_vectors
    words = [_word_vector(components, w, enc.ids.device) for w in init_words(options)]
    length = enc.ids.shape[1]
    start = enc.n_tokens + 1
    if start + n + 1 > length:
        raise ConfigError(f"prompt ({enc.n_tokens} tokens) + {n} token vectors do not fit in {length - 2} tokens")
    init = torch.stack([v for v, _, _ in words])
    ids = _insert(enc.ids, enc.ids.new_tensor([[i for _, i, _ in words]]), start)
    ids_2 = None if enc.ids_2 is None else _insert(enc.ids_2, enc.ids.new_tensor([[i for _, _, i in words]]), start)
    embeds = _insert(enc.input_embeds, init[None], start)
    hidden, pooled = encode_from_embeds(components, embeds, ids, ids_2, options.clip_skip)
    strings = enc.token_strings[:start] + [f"<v{i}>" for i in range(n)] + enc.token_strings[start:length - n]
    plain = PromptEncoding(ids=ids, input_embeds=embeds, hidden=hidden, n_tokens=enc.n_tokens + n,
                           token_strings=strings, pooled=pooled, ids_2=ids_2)
    return plain, init.detach().clone(), start


def _guide_tokens(components, guide: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
    """All guide images' tokens concatenated: [1, sum P, D]."""
    items = guide if isinstance(guide, (list, tuple)) else [guide]
    tokens = [encode_image(components, as_image_batch(g)) for g in items]
    return torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)


@torch.no_grad()
def make_context(components, prompt: str, negative: str = "", guide: ImageLike | Sequence[ImageLike] | None = None,
                 concepts: str | Sequence[str] | None = None, init_image: ImageLike | None = None,
                 options: GuidanceOptions | None = None) -> GuidanceContext:
    """Build the per-run :class:`GuidanceContext`.

    guide: a path / tensor [n, 3, H, W] in [0, 1], or a list of them (their tokens are pooled);
    an empty prompt with a guide image is image-only guidance. concepts: one or more concept
    prompts (need a guide image). init_image: img2img start image (enables ``strength``).
    """
    o = options or GuidanceOptions()
    _check_options(o, components)
    concept_list = [concepts] if isinstance(concepts, str) else list(concepts or [])
    has_guide = guide is not None and not (isinstance(guide, (list, tuple)) and not guide)
    if not prompt.strip() and not has_guide:
        raise ConfigError("empty prompt and no guide image: give a prompt, a guide image, or both")
    if concept_list and not has_guide:
        raise ConfigError("concept mapping needs a guide image")
    if any(not c.strip() for c in concept_list):
        raise ConfigError("empty concept prompt")
    enc = encode_prompt(components, prompt, o.clip_skip)
    plain, init, start = (enc, None, 0)
    if o.n_vectors > 0:
        plain, init, start = _with_placeholders(components, enc, o)
    ctx = GuidanceContext(components=components, options=o, prompt=prompt, plain=plain,
                          negative=encode_negative(components, negative, o.clip_skip),
                          vector_init=init, vector_start=start)
    if init_image is not None:
        ctx.init_image = as_image_batch(init_image)[:1]
    if has_guide:
        ctx.image_tokens = _guide_tokens(components, guide).to(plain.hidden.dtype)
        ctx.part = guide_part(components)
        ctx.mapping = map_image_tokens(plain.hidden[..., ctx.part], ctx.image_tokens, o.mapping, o.reuse)
        ctx.profile = cluster_profile(ctx.mapping.alignment, o.cluster_radius)
    if concept_list:
        hidden = [encode_prompt(components, c, o.clip_skip) for c in concept_list]
        tokens = torch.cat([e.hidden[:, 1:e.n_tokens + 1, ctx.part] for e in hidden], dim=1)
        ctx.concepts = map_concepts(plain.hidden[..., ctx.part], tokens, ctx.image_tokens, o.concept_threshold,
                                    o.softness)
    return ctx
