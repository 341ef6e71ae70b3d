"""Per-image losses [λ, B] -> one loss per candidate [λ].

The basic summary is ``mean + w·spread`` over a candidate's B images (spread: consistency
across seeds; without roots, the population std as numpy's). Given each image's root
(``roots`` [B]: images of different roots have independent noise), the spread comes from
independent pairs only, as Gini's mean difference scaled to the std of a normal
distribution (E|X - Y| = 2σ/√π):

    spread = √π/2 · mean over pairs i, j of different roots of |x_i - x_j|.

A mean over independent pairs is a U-statistic: unbiased for √π/2 · E|X - Y| whatever the
design, B independent images of a plain batch (all pairs) or a hyperbatch's 2 roots with
their correlated siblings (cross-root pairs). A square root of the pairs' variance
estimate is not: its downward (Jensen) bias grows as the independent pairs carry less
information, so with two roots a hyperbatch would read consistently too low against a
plain batch of the same conditioning, and most for skewed per-image losses (a pinned
result that mostly hits and sometimes fails). With a hyperbatch lineage,
sd-prompt-pinning's hyperbatch weightings apply over lineage depth K:

* the lineage [B, depth] gives, per column k, the branch of image b at branch point k
  (any integer ids; images share an ancestor at level k iff their rows agree on the
  first k columns). Level K = 1 is the root (all B images in one group); every level
  that splits the groups further adds K + 1, so the leaves (one image per group) are
  deepest. Columns that split nothing (e.g. an all-zero root column) add no level.
* at each level, X_K = mean over its groups of (group mean + w·group std): the root gives
  the plain summary, deeper levels weigh consistency among closer relatives;
* geometric X^(s/K), exponential X·(0.5+s)^K or polynomial (1+X)^(s·K) (s = ``scale``),
  averaged over the L levels (sd-prompt-pinning sums them; the mean ranks candidates the same
  and keeps the loss on the per-image scale).

A candidate with any non-finite image loss is broken and scores ``WORST_LOSS``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from embedpin.config import WEIGHTINGS as WEIGHTINGS  # (one definition, in embedpin.config)

WORST_LOSS = 1e10  # finite, exact in float32, above any real loss (CMA-ES only needs the ranking)


def lineage_levels(lineage: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Group ids [L, B] per lineage level, root first (see module docstring)."""
    root = torch.zeros(1, batch, dtype=torch.long)
    if lineage is None:
        return root
    lineage = torch.as_tensor(lineage).cpu()
    if lineage.dim() != 2 or lineage.shape[0] != batch:
        raise ValueError(f"lineage of shape {tuple(lineage.shape)} does not match a batch of {batch}")
    levels = [root[0]]
    for k in range(1, lineage.shape[1] + 1):
        ids = torch.unique(lineage[:, :k], dim=0, return_inverse=True)[1]
        if ids.max() > levels[-1].max():  # a real split (prefix groups only ever refine)
            levels.append(ids)
    return torch.stack(levels)


def level_summaries(x: torch.Tensor, levels: torch.Tensor, std_weight: float) -> torch.Tensor:
    """X [λ, L]: per level, the mean over groups of (group mean + w·group std) of x [λ, B]."""
    onehot = F.one_hot(levels.to(x.device), x.shape[-1]).to(x.dtype)  # [L, B, G]
    counts = onehot.sum(1)  # [L, G]
    mean = torch.einsum("nb,lbg->nlg", x, onehot) / counts.clamp(min=1)
    per_image_mean = torch.einsum("nlg,lbg->nlb", mean, onehot)
    var = torch.einsum("nlb,lbg->nlg", (x[:, None] - per_image_mean) ** 2, onehot) / counts.clamp(min=1)
    summary = mean + std_weight * var.sqrt()
    used = (counts > 0).to(x.dtype)
    return (summary * used).sum(-1) / used.sum(-1)


def weigh_levels(summaries: torch.Tensor, weighting: str, scale: float) -> torch.Tensor:
    """Seed 003's hyperbatch weights over levels K = 1..L of X [λ, L], averaged: [λ]."""
    k = torch.arange(1, summaries.shape[-1] + 1, dtype=summaries.dtype, device=summaries.device)
    if weighting == "none":
        return summaries[:, 0]
    if weighting == "geometric":
        w = summaries.clamp(min=0) ** (scale / k)
    elif weighting == "exponential":
        w = summaries * (0.5 + scale) ** k
    elif weighting == "polynomial":
        w = (1 + summaries) ** (scale * k)
    else:
        raise ValueError(f"unknown hyperbatch weighting {weighting!r}; choose one of {WEIGHTINGS}")
    return w.mean(-1)


def independent_spread(x: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """Spread [λ] of x [λ, B] across seeds: √π/2 · the mean |x_i - x_j| over the pairs of
    images with different roots [B] (module doc); the population std where all images
    share one root (no independent pair)."""
    apart = roots.to(x.device)[:, None] != roots.to(x.device)[None, :]
    if not bool(apart.any()):
        return x.std(-1, correction=0)
    d = (x[:, :, None] - x[:, None, :]).abs()
    return math.sqrt(math.pi) / 2 * (d * apart).sum((-1, -2)) / apart.sum()


def aggregate(per_image: torch.Tensor, lineage: torch.Tensor | None = None, std_weight: float = 1.0,
              weighting: str = "none", scale: float = 1.0, roots: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate losses [λ] from per-image losses [λ, B] (and the batch's lineage [B, depth],
    each image's root [B]: see the module doc).

    Never raises on bad values: a candidate with a NaN/inf image loss gets ``WORST_LOSS``."""
    x = per_image.double()
    broken = ~torch.isfinite(x).all(-1)
    x = torch.where(torch.isfinite(x), x, 0.0)
    levels = lineage_levels(lineage if weighting != "none" else None, x.shape[-1])
    summaries = level_summaries(x, levels, std_weight)
    if roots is not None:
        summaries[:, 0] = x.mean(-1) + std_weight * independent_spread(x, torch.as_tensor(roots))
    loss = weigh_levels(summaries, weighting, scale)
    loss = torch.where(broken | ~torch.isfinite(loss), WORST_LOSS, loss.clamp(max=WORST_LOSS))
    return loss.to(torch.float64 if per_image.dtype == torch.float64 else torch.float32)
