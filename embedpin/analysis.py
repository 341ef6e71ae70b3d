"""Token analysis: which parts of the prompt lock the pinned result in.

sd-prompt-pinning's first stated problem is that "it can be difficult to tell which
parts of the prompts are 'locking in' a particular result". For a finished or stopped run, per
prompt token (placeholders included, every chunk of a long prompt):

- **weight**: the pinned result's effective weight, the written emphasis times the searched
  multiplier (what ``(word:w)`` would write);
- **spread**: how tightly the search holds it: the final search distribution N(m, σ²C) along the
  token's coordinate, mapped through the block's bounded transform v (``embedpin.optimizer.space``) to
  weight units: (v(m + s) - v(m - s)) / 2 with s = σ·sqrt(C_ii), times the written weight
  (MO-CMA-ES: the lowest-loss parent's distribution); None when token weights were not searched;
- **effects**: the change of the validation loss (the run's validation seeds, plain batches, as a
  user renders) of the pinned result when the token is removed from the prompt (re-encoded
  without it; a placeholder: without its vector), when its weight is set to 0, and when its
  weight is doubled. Positive: the result gets worse without the token as pinned.

A token's **verdict**, from the effects relative to the pinned result's validation loss L:
*tight* when moving its weight (to 0 or to 2×) raises the loss by at least :data:`TIGHT` · L (the
result hinges on the weight as pinned); *irrelevant* when no variant, removal included, moves the
loss by more than :data:`IRRELEVANT` · L; *loose* otherwise. Removal is shown but does not make a
token tight: leaving a token out shifts every later token's position, which moves the result of
a pinned prompt whatever the word (measured on the micro model: removing "a" cost as much as
removing the colour word), so it measures the prompt's length more than the word.

All variants (3n + 1 conditionings for n tokens) are built in batches and rendered in chunks of
the run's population size, with the run's sampler, steps and validation seeds. The removal of a
token re-encodes the prompt without it and applies the pinned parameters to the rest (its own
token weight dropped; a delta keeps its coefficients in the new context's basis).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from embedpin.errors import ConfigError, InputError
from embedpin.evaluation.session import Session, validation_plan
from embedpin.evaluation.setup import input_digests
from embedpin.guidance.build import Conditioning, build
from embedpin.optimizer.cmaes import CMAES
from embedpin.optimizer.mo import MOCMAES
from embedpin.store import ANALYSIS, CONFIG, RunStore, TokenAnalysis, TokenRow, load_run, read_analysis, write_json

TIGHT = 0.10       # weight 0 or 2x raises the loss by >= 10 % of the pinned loss
IRRELEVANT = 0.01  # no variant moves the loss by more than 1 % of the pinned loss
DEFAULT_SEEDS = 8  # validation seeds when the run had validation off


def verdict(loss: float, remove: float, zero: float, double: float) -> str:
    """tight / loose / irrelevant (module docstring) from the effects and the pinned loss."""
    scale = max(abs(loss), 1e-12)
    if max(zero, double) >= TIGHT * scale:
        return "tight"
    if max(abs(remove), abs(zero), abs(double)) <= IRRELEVANT * scale:
        return "irrelevant"
    return "loose"


def weight_spread(run: RunStore, session: Session) -> np.ndarray | None:
    """Per token, the final search distribution's spread along its weight multiplier (weight
    multiplier units, module docstring); None when token weights were not searched or the run
    has no optimizer state yet."""
    if "token_weights" not in session.space.names or not run.state.optimizer:
        return None
    state = run.state.optimizer
    opt = (MOCMAES if "parents" in state else CMAES).from_state(state)
    centre, std = opt.spread()
    block = next(b for b in session.space.blocks if b.name == "token_weights")
    sl = session.space.slices["token_weights"]
    m, s = centre[sl], std[sl]
    return (block.to_value(m + s) - block.to_value(m - s)) / 2


def _pinned_params(run: RunStore) -> dict[str, np.ndarray]:
    """The pinned result's parameters {block: [1, size]} (none: the plain prompt)."""
    best = run.best
    if best is None or best.kind == "plain" or not best.params:
        return {}
    return {k: np.asarray(v, dtype=np.float64)[None] for k, v in best.params.items()}


def _tensors(params: dict[str, np.ndarray], like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(like) for k, v in params.items()}


def variants(session: Session, params: dict[str, np.ndarray]) -> list[Conditioning]:
    """The conditionings to render, their candidates in this order: the pinned result, each
    token's weight at 0, each token's weight doubled (one batch from the run's context), then
    each token removed (one context each; a placeholder: the pinned vectors without its own)."""
    ctx = session.ctx
    n, like = ctx.plain.n_tokens, ctx.plain.hidden
    tw = params.get("token_weights", np.ones((1, n)))
    weights = np.repeat(tw, 2 * n + 1, axis=0)
    weights[1 + np.arange(n), np.arange(n)] = 0.0
    weights[1 + n + np.arange(n), np.arange(n)] *= 2.0
    rest = {k: np.repeat(v, 2 * n + 1, axis=0) for k, v in params.items() if k != "token_weights"}
    out = [build(ctx, _tensors({**rest, "token_weights": weights}, like))]
    vectors = out[0].token_vectors[0] if out[0].token_vectors is not None else None
    n_prompt = n - (0 if vectors is None else len(vectors))
    kept = {k: v for k, v in params.items() if k not in ("token_vectors", "token_weights")}
    for k in range(n):
        sub, omit = vectors, k
        if k >= n_prompt:
            keep = [j for j in range(len(vectors)) if j != k - n_prompt]
            sub, omit = (vectors[keep] if keep else None), None
        p = dict(kept, token_weights=np.delete(tw, k, axis=1)) if n > 1 else kept
        try:
            out.append(build(session.context_without(omit, sub), _tensors(p, like)))
        except ConfigError:  # the prompt's only token, no guide image: nothing left to condition on
            out.append(_slice(out[0], slice(1 + k, 2 + k)))
    return out


def _slice(cond: Conditioning, sl: slice) -> Conditioning:
    """Candidates ``sl`` of ``cond``."""
    return replace(cond, prompt_embeds=cond.prompt_embeds[sl], cfg=cond.cfg[sl], token_vectors=None,
                   strength=None if cond.strength is None else cond.strength[sl],
                   pooled_embeds=None if cond.pooled_embeds is None else cond.pooled_embeds[sl])


def _cat(conds: list[Conditioning]) -> Conditioning:
    """The candidates of conditionings of one sequence length as one."""
    def cat(name):
        values = [getattr(c, name) for c in conds]
        return None if values[0] is None else torch.cat(values)
    return replace(conds[0], prompt_embeds=cat("prompt_embeds"), cfg=cat("cfg"), strength=cat("strength"),
                   token_vectors=None, pooled_embeds=cat("pooled_embeds"))


def render_losses(session: Session, conds: list[Conditioning], plan, chunk: int) -> np.ndarray:
    """Every candidate's loss on ``plan``, in order: consecutive conditionings of one sequence
    length rendered together, ``chunk`` candidates per render call."""
    losses: list[float] = []
    for _, group in itertools.groupby(conds, key=lambda c: c.prompt_embeds.shape[1]):
        cond = _cat(list(group))
        for i in range(0, len(cond.cfg), chunk):
            losses += session.render_scored(_slice(cond, slice(i, i + chunk)), plan)[1].loss.double().cpu().tolist()
    return np.asarray(losses)


def analyze(run_dir: str | Path, device: str = "auto") -> TokenAnalysis:
    """Measure the token table of the run at ``run_dir`` (its last committed state) and keep it
    in the run folder (``analysis.json``, which the report shows); refused when an input file is
    not the one the run started with."""
    run = load_run(run_dir)
    config = run.config()
    if config is None:
        raise InputError(f"{run.root} has no {CONFIG}")
    run.check_inputs(input_digests(config))
    config.model.device = device
    session = Session.of_run(run, config)
    plan = session.validation or validation_plan(
        replace(config, optim=replace(config.optim, validation_seeds=DEFAULT_SEEDS)), session.plan)
    params = _pinned_params(run)
    chunk = max(1, session.config.optim.population or 8)
    losses = render_losses(session, variants(session, params), plan, chunk)
    n = session.ctx.plain.n_tokens
    base = float(losses[0])
    zero, double, remove = (losses[1 + i * n:1 + (i + 1) * n] - base for i in range(3))
    spread = weight_spread(run, session)
    written = session.ctx.plain.weights.double().cpu().numpy()
    mult = params.get("token_weights", np.ones((1, n)))[0]
    n_prompt = n - len(session.ctx.plain.placeholders)
    rows = [TokenRow(index=k, token=label, placeholder=k >= n_prompt, written=float(written[k]),
                     weight=float(written[k] * mult[k]),
                     spread=None if spread is None else float(written[k] * spread[k]),
                     remove=float(remove[k]), zero=float(zero[k]), double=float(double[k]),
                     verdict=verdict(base, float(remove[k]), float(zero[k]), float(double[k])))
            for k, label in enumerate(session.ctx.plain.labels)]
    plain = run.state.plain_validation
    result = TokenAnalysis(generation=run.count, loss=base, plain=None if plain is None else plain.loss,
                           seeds=plan.batch, tight=TIGHT, irrelevant=IRRELEVANT, rows=rows)
    write_json(run.root / ANALYSIS, result.to_json())
    return result


def analysis_for(run_dir: str | Path, device: str = "auto", again: bool = False) -> tuple[TokenAnalysis, bool]:
    """The run's token table: the stored one when it was measured at the run's current
    generation (unless ``again``), else measured now. Returns (it, whether it was measured now)."""
    run = load_run(run_dir)
    stored = read_analysis(run.root)
    if stored is not None and stored.generation == run.count and not again:
        return stored, False
    return analyze(run_dir, device), True


def _effect(value: float, loss: float) -> str:
    return f"{value:+.4f} ({100 * value / max(abs(loss), 1e-12):+.0f}%)"


def table(a: TokenAnalysis) -> str:
    """The token table as text: one row per token, then how to read it."""
    header = ("token", "weight", "spread", "remove", "weight 0", "weight 2x", "verdict")
    rows = [(r.token + (" (placeholder)" if r.placeholder else ""),
             f"{r.weight:.3f}" + ("" if r.written == 1 else f" (written {r.written:g})"),
             "-" if r.spread is None else f"±{r.spread:.3f}",
             _effect(r.remove, a.loss), _effect(r.zero, a.loss), _effect(r.double, a.loss), r.verdict)
            for r in a.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    plain = "" if a.plain is None else f"; the plain prompt's: {a.plain:.4f}"
    return "\n".join([
        f"pinned result after {a.generation} generation(s): validation loss {a.loss:.4f} on {a.seeds} validation "
        f"seeds{plain}",
        line(header), *(line(r) for r in rows),
        f"effects: the change of that loss (+: worse) when the token is removed from the prompt, its weight set to 0, "
        f"or doubled; spread: the search's final standard deviation along the token's weight (-: weights not "
        f"searched). tight: weight 0 or 2x costs >= {100 * a.tight:g}% of the loss; irrelevant: no change above "
        f"{100 * a.irrelevant:g}%; loose: the rest.",
    ])
