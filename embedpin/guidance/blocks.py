"""The guidance search blocks: names, sizes, bounds, defaults and scales (names are API).

Scalar FlexDiffuse blocks: linear_start, linear_end, clustered, threshold, threshold_floor,
max_image, header_cap (see :mod:`embedpin.guidance.tween`) and concept; run-level blocks:
cfg, strength (img2img only); embedding blocks: token_weights (one multiplier per prompt
token, 1 = neutral), delta (K coefficients), token_vectors (N*K coefficients). At every
block's default the conditioning is exactly the plain prompt's. ``"guidance"`` in
``enabled`` stands for all FlexDiffuse blocks the context supports.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedpin.errors import ConfigError
from embedpin.guidance.flex import FLEX_PARAMS
from embedpin.optimizer.space import Block

# name -> (lower, upper, default, scale); None default = taken from the run's options
SCALARS: dict[str, tuple[float, float, float | None, float]] = {
    "linear_start": (-1.0, 1.5, 0.0, 0.25),
    "linear_end": (-1.0, 1.5, 0.0, 0.25),
    "clustered": (-1.0, 1.5, 0.0, 0.25),
    "threshold": (-1.0, 1.5, 0.0, 0.25),
    "threshold_floor": (0.0, 1.0, 0.5, 0.1),
    "max_image": (0.0, 1.5, 1.0, 0.25),
    "header_cap": (0.0, 0.3, 0.15, 0.05),
    "concept": (-1.0, 1.5, 0.0, 0.25),
    "cfg": (1.0, 30.0, None, 1.0),
    "strength": (0.05, 1.0, None, 0.1),
}
TOKEN_WEIGHTS = (0.0, 2.0, 1.0, 0.2)
DELTA = (-1.0, 1.0, 0.0, 0.05)
TOKEN_VECTORS = (-1.0, 1.0, 0.0, 0.25)
BLOCK_NAMES = (*SCALARS, "token_weights", "delta", "token_vectors")
FILE_BLOCKS = ("token_vectors", "cfg", "strength")  # what a textual-inversion file (vectors) and its recipe carry


def requirement(ctx, name: str) -> str | None:
    """Why ``name`` cannot be searched in this context (None if it can)."""
    if name in FLEX_PARAMS and not ctx.guided:
        return "needs a guide image"
    if name == "concept" and not ctx.concept_parts:
        return "needs a concept prompt and a guide image"
    if name == "strength" and ctx.init_image is None:
        return "needs an img2img init image"
    if name == "token_weights" and ctx.plain.n_tokens == 0:
        return "needs a prompt with at least one token"
    if name == "token_vectors" and ctx.options.n_vectors == 0:
        return "needs n_vectors > 0"
    return None


def expand(ctx, enabled: set[str] | Sequence[str]) -> list[str]:
    """Enabled names in canonical order, with "guidance" expanded; unknown/unsupported -> ConfigError."""
    names = set(enabled)
    if "guidance" in names:
        names.discard("guidance")
        names |= {n for n in (*FLEX_PARAMS, "concept") if requirement(ctx, n) is None}
    unknown = names - set(BLOCK_NAMES)
    if unknown:
        raise ConfigError(f"unknown search block(s) {', '.join(sorted(unknown))}; "
                          f"choose from: guidance, {', '.join(BLOCK_NAMES)}")
    for n in names:
        why = requirement(ctx, n)
        if why:
            raise ConfigError(f"search block {n!r} {why}")
    return [n for n in BLOCK_NAMES if n in names]


def spec(ctx, name: str) -> Block:
    """The :class:`Block` for one name in this context."""
    o = ctx.options
    if name in SCALARS:
        lo, hi, default, scale = SCALARS[name]
        default = {"cfg": o.cfg, "strength": o.strength}.get(name, default)
        if not lo <= default <= hi:
            raise ConfigError(f"{name} = {default} is outside [{lo}, {hi}]")
        return Block(name, 1, lo, hi, default, scale)
    size = {"token_weights": ctx.plain.n_tokens, "delta": o.delta_k, "token_vectors": o.n_vectors * ctx.vector_rank}[name]
    lo, hi, default, scale = {"token_weights": TOKEN_WEIGHTS, "delta": DELTA, "token_vectors": TOKEN_VECTORS}[name]
    return Block(name, size, lo, hi, default, scale)


def blocks(ctx, enabled: set[str] | Sequence[str]) -> list[Block]:
    """Blocks for the enabled names, in canonical order."""
    return [spec(ctx, n) for n in expand(ctx, enabled)]
