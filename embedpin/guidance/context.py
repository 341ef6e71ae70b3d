"""The guidance context: everything a run's candidates share, computed once per run.

Encodings of the prompt (with the token-vector placeholders, if any) and the negative
prompt, the guide images' tokens and their mapping onto the prompt, the cluster profile,
the concept mapping and the delta / token-vector bases (the last two on first use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from embedpin.config import BASES, MICRO, VECTOR_BASES, OptimConfig, RenderConfig, SearchConfig
from embedpin.errors import ConfigError
from embedpin.guidance.blocks import blocks
from embedpin.guidance.concepts import ConceptMapping, map_concepts
from embedpin.guidance.deltas import (
    DeltaBasis,
    image_basis,
    pca_directions,
    pooled_directions,
    random_joint_basis,
    random_orthonormal,
    random_sequence_basis,
    sequence_basis,
    with_pooled,
)
from embedpin.guidance.encode import (
    PromptEncoding,
    encode_image,
    encode_negative,
    encode_prompt,
    guide_part,
    input_widths,
)
from embedpin.guidance.images import ImageLike, as_image_batch
from embedpin.guidance.mapping import MODES, Mapping, map_image_tokens
from embedpin.guidance.tokens import chunk_count
from embedpin.guidance.tween import cluster_profile

if TYPE_CHECKING:
    from embedpin.models.components import Components



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
    used when those blocks are not searched; omit_token: leave the prompt's token of that index
    out (token analysis: the pinned result without one token); placeholders_first: the
    placeholders stand before the prompt's words (``"<pin> <prompt>"``) instead of after them.
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
    cfg: float = MICRO.cfg
    strength: float = RenderConfig.strength
    omit_token: int | None = None  # token analysis: the prompt without its token of this index
    placeholders_first: bool = False  # the placeholders stand before the prompt's words, not after


@dataclass
class GuidedPart:
    """What one image tower contributes: ``part``, the features of the sequence its projection
    matches (:func:`guide_part`: all of them, or one SDXL encoder's); the guide images' tokens
    [1, P, Dp] in that projection; their mapping onto the prompt's part, the cluster profile
    [1, L] and the concept mapping (None without concept prompts)."""

    part: slice
    image_tokens: torch.Tensor
    mapping: Mapping
    profile: torch.Tensor
    concepts: ConceptMapping | None = None


def on_part(text: torch.Tensor, part: slice, fn) -> torch.Tensor:
    """``fn`` applied to the features ``part`` of text [λ|1, L, D], the rest unchanged: [λ, L, D]."""
    if part == slice(None):
        return fn(text)
    inner = fn(text[..., part])
    outer = text.expand(inner.shape[0], -1, -1)
    return torch.cat([outer[..., :part.start], inner, outer[..., part.stop:]], dim=-1)


@dataclass
class GuidanceContext:
    """Precomputed per-run guidance state; build with :func:`make_context`.

    plain: the prompt's encoding ([1, L, D] hidden), with the placeholders at the init word
    when ``options.n_vectors`` > 0: what every parameter at its default reproduces exactly.
    guided: one :class:`GuidedPart` per image tower that maps the guide images onto the prompt
    (empty without a guide image; SDXL with two towers: one per encoder).
    vector_init [N, Din] when n_vectors > 0 (the placeholders sit at ``plain.placeholders``).
    Prompt and negative have the same number of 77-position chunks (the shorter padded).
    """

    components: Components
    options: GuidanceOptions
    prompt: str
    plain: PromptEncoding
    negative: PromptEncoding
    guided: list[GuidedPart] = field(default_factory=list)
    init_image: torch.Tensor | None = None
    vector_init: torch.Tensor | None = None

    @property
    def concept_parts(self) -> list[GuidedPart]:
        """The guided parts with a concept mapping."""
        return [g for g in self.guided if g.concepts is not None]

    @property
    def guidance_note(self) -> str | None:
        """Where image guidance acts when it is not the whole sequence (SDXL with one tower)."""
        width = self.plain.hidden.shape[-1]
        covered = sum(width if g.part == slice(None) else g.part.stop - g.part.start for g in self.guided)
        if not self.guided or covered == width:
            return None
        g = self.guided[0]
        which = "first" if g.part.start == 0 else "second"
        return (f"image guidance acts on the {which} text encoder's part of the conditioning ({covered} of {width} "
                f"features): the image tower's projection matches only that encoder (a second --clip tower "
                f"whose projection matches the other encoder guides the rest)")

    def mapped(self, text: torch.Tensor) -> torch.Tensor:
        """text [1, L, D] with every guided part replaced by its mapped image tokens."""
        for g in self.guided:
            text = on_part(text, g.part, g.mapping.tokens)
        return text

    @property
    def window(self) -> int:
        """Positions per chunk (77): each chunk starts with a header (BOS)."""
        return self.plain.window

    @property
    def length(self) -> int:
        return self.plain.hidden.shape[1]

    @cached_property
    def tables(self) -> list[torch.Tensor]:
        """Each text encoder's token-embedding table [V, Din_e] (SDXL: two)."""
        return [te.get_input_embeddings().weight.detach().float() for te in self.components.text_encoders]

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
    def delta_basis(self) -> DeltaBasis:
        """Conditioning-delta basis: K orthogonal elements, each with the plain conditioning's
        norm. On SDXL each element also has a pooled part (:func:`with_pooled`: the second
        encoder's projection of the element's mean row in that encoder's features; or, for
        the random basis, random too), orthonormalised jointly with the sequence part, so
        that coefficients c move the conditioning by exactly ||c|| in
        :func:`~embedpin.guidance.build.distance`."""
        o, h, pooled = self.options, self.plain.hidden, self.plain.pooled
        kind = o.delta_basis or ("image" if self.guided else "pca")
        gen = torch.Generator().manual_seed(o.seed)
        if kind == "random" and pooled is not None:
            unit = random_joint_basis(o.delta_k, self.length, h.shape[-1], pooled.shape[-1], gen, h, self.window)
        elif kind == "random":
            unit = DeltaBasis(random_sequence_basis(o.delta_k, self.length, h.shape[-1], gen, h, self.window))
        elif kind == "pca":
            unit = DeltaBasis(sequence_basis(self.table_directions[: o.delta_k], self.length, self.window))
        elif self.guided:
            unit = DeltaBasis(image_basis(h, self.mapped(h), o.delta_k, self.window))
        else:
            raise ConfigError("delta basis 'image' needs a guide image")
        if pooled is not None and unit.pooled is None:
            projection = self.components.text_encoder_2.text_projection.weight
            second = unit.sequence[..., input_widths(self.components)[0]:]
            unit = with_pooled(unit.sequence, pooled_directions(second, projection))
        return unit.scaled(h, pooled)

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


def _check_options(o: GuidanceOptions, components) -> None:
    d = components.text_dim
    if o.mapping not in MODES:
        raise ConfigError(f"unknown mapping mode {o.mapping!r}; choose one of: {', '.join(MODES)}")
    if o.delta_basis is not None and o.delta_basis not in BASES:
        raise ConfigError(f"unknown delta basis {o.delta_basis!r}; choose one of: {', '.join(BASES)}")
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


def _word_vector(components, word: str, device) -> torch.Tensor:
    """An init word's input embedding [Din] (the mean of its tokens' if it splits; SDXL: each
    encoder's, side by side)."""
    ids = [tok(word, add_special_tokens=False).input_ids for tok in components.tokenizers]
    if not all(ids):
        raise ConfigError(f"init word {word!r} has no tokens")
    parts = [te.get_input_embeddings()(torch.tensor(i, device=device)).float().mean(0)
             for te, i in zip(components.text_encoders, ids)]
    return torch.cat(parts)


def _init_vectors(components, options: GuidanceOptions, vectors: torch.Tensor | None) -> torch.Tensor:
    """The placeholders' start [N, Din]: ``vectors`` (an existing embedding's), or each init
    word's embedding (the mean of its tokens if it splits)."""
    if vectors is not None:
        if len(vectors) != options.n_vectors:
            raise ConfigError(f"{len(vectors)} init vectors for {options.n_vectors} placeholders")
        return vectors.to(components.text_encoder.device, torch.float32)
    device = components.text_encoder.device
    return torch.stack([_word_vector(components, w, device) for w in init_words(options)]).float()


def _guide_tokens(components, guide: ImageLike | Sequence[ImageLike], tower) -> torch.Tensor:
    """All guide images' tokens in ``tower``'s projection, concatenated: [1, sum P, Dp]."""
    items = guide if isinstance(guide, (list, tuple)) else [guide]
    tokens = [encode_image(components, as_image_batch(g), tower) for g in items]
    return torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)


def _joined(x):
    """A per-chunk result (a tensor [c, W, ...] or a dataclass of them) as one row [1, c·W, ...]."""
    if isinstance(x, torch.Tensor):
        return x.reshape(1, -1, *x.shape[2:])
    return type(x)(**{f.name: _joined(getattr(x, f.name)) for f in fields(x)})


def _per_chunk(fn, window: int, seq: torch.Tensor, *shared: torch.Tensor):
    """``fn`` on every chunk of seq [1, c·W, ...] as its own row (so each chunk has its own
    header), ``shared`` [1, ...] tensors repeated per chunk; the result joined into one row."""
    rows = seq.reshape(-1, window, *seq.shape[2:])
    return _joined(fn(rows, *(t.expand(len(rows), *t.shape[1:]) for t in shared)))


def _guided_parts(components, plain: PromptEncoding, guide, concepts: list[str], o: GuidanceOptions) -> list[GuidedPart]:
    """One :class:`GuidedPart` per image tower; two towers on the same features are refused.
    A long prompt is mapped chunk by chunk (each chunk's BOS is a header, paired with CLS)."""
    if not components.towers:
        guide_part(components)  # raises: no image encoder
    parts, out = [guide_part(components, t) for t in components.towers], []
    if len(set(map(str, parts))) < len(parts):
        raise ConfigError("two image towers map onto the same text features; give one --clip per text encoder "
                          "(SDXL: a ViT-L/14 tower for the first, a ViT-bigG tower for the second)")
    concept_hidden = [encode_prompt(components, c, o.clip_skip) for c in concepts]
    window = plain.window
    for tower, part in zip(components.towers, parts):
        text = plain.hidden[..., part]
        tokens = _guide_tokens(components, guide, tower).to(plain.hidden.dtype)
        mapping = _per_chunk(lambda t, i: map_image_tokens(t, i, o.mapping, o.reuse), window, text, tokens)
        profile = _per_chunk(lambda a: cluster_profile(a, o.cluster_radius), window, mapping.alignment)
        g = GuidedPart(part, tokens, mapping, profile)
        if concept_hidden:
            words = torch.cat([e.hidden[:, e.positions, part] for e in concept_hidden], dim=1)
            g.concepts = _per_chunk(lambda t, w, i: map_concepts(t, w, i, o.concept_threshold, o.softness),
                                    window, text, words, tokens)
        out.append(g)
    return out


@torch.no_grad()
def make_context(components, prompt: str, negative: str = "", guide: ImageLike | Sequence[ImageLike] | None = None,
                 concepts: str | Sequence[str] | None = None, init_image: ImageLike | None = None,
                 options: GuidanceOptions | None = None, init_vectors: torch.Tensor | None = None) -> GuidanceContext:
    """Build the per-run :class:`GuidanceContext`.

    guide: a path / tensor [n, 3, H, W] in [0, 1], or a list of them (their tokens are pooled);
    an empty prompt with a guide image is image-only guidance. concepts: one or more concept
    prompts (need a guide image). init_image: img2img start image (enables ``strength``).
    init_vectors [n_vectors, Din]: the placeholders' start (an existing embedding) instead of
    the init words. A prompt, a guide image or both, and a guide image for concepts: a run's
    config is checked for them (RunConfig.validate), so they are not checked again here.
    """
    o = options or GuidanceOptions()
    _check_options(o, components)
    concept_list = [concepts] if isinstance(concepts, str) else list(concepts or [])
    has_guide = guide is not None and not (isinstance(guide, (list, tuple)) and not guide)
    if any(not c.strip() for c in concept_list):
        raise ConfigError("empty concept prompt")
    init = _init_vectors(components, o, init_vectors) if o.n_vectors > 0 else None
    chunks = max(chunk_count(components, prompt, o.n_vectors), chunk_count(components, negative))
    plain = encode_prompt(components, prompt, o.clip_skip, init, chunks, o.omit_token, o.placeholders_first)
    ctx = GuidanceContext(components=components, options=o, prompt=prompt, plain=plain,
                          negative=encode_negative(components, negative, o.clip_skip, chunks),
                          vector_init=None if init is None else init.to(plain.input_embeds))
    if init_image is not None:
        ctx.init_image = as_image_batch(init_image)[:1]
    if has_guide:
        ctx.guided = _guided_parts(components, plain, guide, concept_list, o)
    return ctx
