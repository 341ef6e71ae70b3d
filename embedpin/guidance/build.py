"""Build all λ candidates' conditionings in one batched call, and measure their distance.

Order of operations on the prompt's hidden states [λ, L, D]:
token vectors (re-encode the prompt with the candidate's placeholder embeddings) ->
token weights (emphasis: the written weights times the searched ones) -> FlexDiffuse image
guidance -> concept override -> additive delta. A block left out of ``params`` takes its default, which changes nothing, so with
no params (or all at their defaults) the result is exactly the plain prompt's.

SDXL's pooled embedding [λ, P] comes from the second encoder's EOS state: the token vectors
(which re-encode the prompt) move it, and so does the delta, whose basis elements have a
pooled part (:attr:`GuidanceContext.delta_basis`); the blocks that reweight or tween the
output sequence (token weights, image guidance, concepts) leave it at the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedpin.errors import ConfigError
from embedpin.guidance.blocks import BLOCK_NAMES, requirement, spec
from embedpin.guidance.concepts import concept_weights
from embedpin.guidance.context import GuidanceContext, on_part
from embedpin.guidance.deltas import delta_from_basis, emphasis, headers, insert_vectors, token_vectors
from embedpin.guidance.encode import encode_from_embeds
from embedpin.guidance.flex import FLEX_PARAMS, image_guidance
from embedpin.guidance.tween import tween


@dataclass
class Conditioning:
    """What the renderer needs per candidate.

    prompt_embeds [λ, L, D]; negative_embeds [1, L, D]; cfg [λ]; strength [λ] (img2img) or
    None; token_vectors [λ, N, Din] placeholder input embeddings (for export) or None;
    SDXL: pooled_embeds [λ, P] and negative_pooled [1, P].
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    cfg: torch.Tensor
    strength: torch.Tensor | None = None
    token_vectors: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def pooled(self) -> dict:
        """The renderer's keyword arguments for the pooled embeddings (empty without them)."""
        if self.pooled_embeds is None:
            return {}
        return {"pooled": self.pooled_embeds, "negative_pooled": self.negative_pooled}

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Candidate ``i``'s conditioning under the names diffusers pipelines take (``prompt_embeds``,
        ``negative_prompt_embeds``, SDXL's pooled pair), plus its ``token_vectors`` [N, Din], as CPU
        float32: what a pinned result file holds."""
        out = {"prompt_embeds": self.prompt_embeds[i:i + 1], "negative_prompt_embeds": self.negative_embeds[:1]}
        if self.pooled_embeds is not None:
            out["pooled_prompt_embeds"] = self.pooled_embeds[i:i + 1]
            out["negative_pooled_prompt_embeds"] = self.negative_pooled[:1]
        if self.token_vectors is not None:
            out["token_vectors"] = self.token_vectors[i]
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def _normalise(ctx: GuidanceContext, params: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """Validate names/shapes -> (λ, {name: [λ, size]} on the conditioning's device and dtype)."""
    like = ctx.plain.hidden
    values = {n: torch.as_tensor(v).to(device=like.device, dtype=like.dtype) for n, v in params.items()}
    lam = max((v.shape[0] if v.ndim else 1 for v in values.values()), default=1)
    out = {}
    for name, v in values.items():
        if name not in BLOCK_NAMES:
            raise ConfigError(f"unknown guidance parameter {name!r}")
        why = requirement(ctx, name)
        if why:
            raise ConfigError(f"parameter {name!r} {why}")
        size = spec(ctx, name).size
        if v.ndim == 0 or v.shape[0] != lam or v.numel() != lam * size:
            raise ConfigError(f"parameter {name!r} has shape {tuple(v.shape)}, expected [{lam}, {size}]")
        out[name] = v.reshape(lam, size)
    return lam, out


def _scalar(ctx: GuidanceContext, p: dict[str, torch.Tensor], name: str, lam: int) -> torch.Tensor:
    """Parameter ``name`` as [λ], its default where not given."""
    if name in p:
        return p[name][:, 0]
    return ctx.plain.hidden.new_full((lam,), spec(ctx, name).default)


def _encode_vectors(ctx: GuidanceContext, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder states [λ, L, D] (before emphasis; SDXL: and pooled [λ, P]) of the prompt with
    each candidate's placeholder vectors.

    Candidates whose vectors equal the init vectors keep the plain encoding bitwise; the
    header rows (each chunk's BOS) are the plain ones (exact under causal attention, kept
    bitwise).
    """
    plain, lam = ctx.plain, vectors.shape[0]
    text = plain.raw.expand(lam, -1, -1).clone()
    pooled = None if plain.pooled is None else plain.pooled.expand(lam, -1).clone()
    changed = (vectors != ctx.vector_init).flatten(1).any(1)
    if changed.any():
        embeds = insert_vectors(plain.input_embeds, vectors[changed], plain.placeholders)
        enc, enc_pooled = encode_from_embeds(ctx.components, embeds, plain.ids, plain.ids_2, ctx.options.clip_skip)
        body = ~headers(ctx.length, ctx.window, enc.device)
        text[changed] = torch.where(body[:, None], enc, plain.raw)
        if pooled is not None:
            pooled[changed] = enc_pooled
    return text, pooled


def candidate_vectors(ctx: GuidanceContext, coeffs: torch.Tensor) -> torch.Tensor:
    """The N placeholder input embeddings [N, Din] of one candidate's token_vectors coefficients
    [N*K] (what exports as a textual-inversion embedding)."""
    if ctx.vector_init is None:
        raise ConfigError("this run has no token vectors (n_vectors = 0)")
    c = torch.as_tensor(coeffs).to(ctx.vector_init).reshape(1, -1)
    return token_vectors(ctx.vector_init, ctx.vector_basis, c, ctx.vector_scale)[0]


@torch.no_grad()
def build(ctx: GuidanceContext, params: dict[str, torch.Tensor]) -> Conditioning:
    """All candidates' conditionings from ``params`` ({block name: [λ, size]}, missing = default)."""
    lam, p = _normalise(ctx, params)
    plain = ctx.plain
    text, pooled = plain.raw, plain.pooled
    vectors = None
    if "token_vectors" in p:
        vectors = token_vectors(ctx.vector_init, ctx.vector_basis, p["token_vectors"], ctx.vector_scale)
        text, pooled = _encode_vectors(ctx, vectors)
    elif ctx.vector_init is not None:
        vectors = ctx.vector_init.expand(lam, -1, -1)
    if "token_weights" in p:  # the search's weights multiply the written ones
        text = emphasis(text, plain.weights * p["token_weights"], plain.positions)
    elif plain.weighted:
        text = plain.hidden if "token_vectors" not in p else emphasis(text, plain.weights[None], plain.positions)
    if ctx.guided and any(n in p for n in FLEX_PARAMS):
        flex = {n: _scalar(ctx, p, n, lam) for n in FLEX_PARAMS}
        for g in ctx.guided:
            text = on_part(text, g.part, lambda t, g=g: image_guidance(t, g.mapping, g.profile, flex,
                                                                       ctx.options.softness, ctx.window))
    if "concept" in p:
        for g in ctx.concept_parts:
            c, w = g.concepts, concept_weights(g.concepts, p["concept"][:, 0])
            text = on_part(text, g.part, lambda t, c=c, w=w: tween(t, c.direction * t.norm(dim=-1, keepdim=True), w))
    if "delta" in p:
        basis = ctx.delta_basis
        text = text + delta_from_basis(p["delta"], basis.sequence)
        if basis.pooled is not None:
            pooled = pooled + p["delta"] @ basis.pooled
    strength = _scalar(ctx, p, "strength", lam) if ctx.init_image is not None else None
    return Conditioning(prompt_embeds=text.expand(lam, -1, -1).contiguous(), negative_embeds=ctx.negative.hidden,
                        cfg=_scalar(ctx, p, "cfg", lam), strength=strength, token_vectors=vectors,
                        pooled_embeds=None if pooled is None else pooled.expand(lam, -1).contiguous(),
                        negative_pooled=ctx.negative.pooled)


def distance(ctx: GuidanceContext, cond: Conditioning) -> torch.Tensor:
    """How far each candidate's conditioning is from the plain prompt's: [λ], >= 0.

    ||prompt_embeds - plain||_F / ||plain||_F (RMS difference over the plain sequence's RMS);
    a delta with coefficients c moves it by exactly ||c|| (orthonormal basis). SDXL: the
    pooled vector counts as one more row of the sequence.
    """
    plain = ctx.plain.hidden
    if cond.pooled_embeds is None:
        return (cond.prompt_embeds - plain).flatten(1).norm(dim=1) / plain.norm()
    ours = torch.cat([cond.prompt_embeds.flatten(1), cond.pooled_embeds], 1)
    ref = torch.cat([plain.flatten(1), ctx.plain.pooled], 1)
    return (ours - ref).norm(dim=1) / ref.norm()
