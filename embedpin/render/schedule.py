"""Hyperbatch branch schedule, lineage and cost (pure functions).

A hyperbatch (sd-prompt-pinning) starts each candidate from one latent
and doubles its batch at ``k = ceil(log2 B)`` branch steps until it holds ``B``
latents; two images share every step before the branch that split their lineages.

Conventions used throughout ``embedpin.render``:

- A branch at step ``s`` happens right after step ``s``'s model evaluation (which the
  copies share with their parent) and before its update, so evaluations at the
  doubled size start at step ``s + 1``.
- Members (lineage nodes) are numbered in birth order: at depth ``d`` the batch holds
  members ``0 .. n_d - 1`` with ``n_0 = 1`` and ``n_{d+1} = min(2 n_d, B)``. At a branch,
  member ``j`` continues unchanged and member ``j + n_d`` is its new copy, so the
  last branch of a non-power-of-two ``B`` only doubles the first ``B - n_d`` members.
  Member 0 is the trunk: it is never re-noised. A copy born at step 0 is a second root
  (fresh initial noise, its own step-0 evaluation), not a re-noised copy.
- Plain batches (no branches) hold members ``0 .. B - 1`` from step 0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from embedpin.errors import ConfigError


def doublings(batch: int) -> int:
    """ceil(log2 B): how many times one latent doubles to reach ``batch`` latents."""
    return max(int(batch) - 1, 0).bit_length()


def branch_schedule(batch: int, steps: int, roots: int = 2) -> list[int]:
    """Steps at which the batch doubles, non-decreasing within ``[0, steps - 2]``.

    ``roots`` independent starting latents per candidate (a power of two): the first
    ``log2(roots)`` doublings happen at step 0, and their copies are roots (fresh initial
    noise, their own step-0 evaluations: ``BranchPath.starting``). Half of all image pairs split
    at the first doubling, a quarter at the second, ..., so the roots set most of the
    diversity and, since images of different roots are independent, how many noise
    samples a candidate's loss averages over. The other doublings are spread evenly up to
    ``L = steps - 1 - max(1, steps // 8)``, so the full batch runs the last eighth of the
    steps; their cost is set by the late ones (the j-th adds 2^(j-1) copies), and siblings
    from late doublings stay close (hyperbatch weights by lineage depth account for that).
    B=8, 20 steps, 2 roots -> [0, 9, 17]: 68 of 160 evaluations; 4 roots -> [0, 0, 17]: 92;
    B=64 -> [0, 3, 7, 10, 14, 17]: 336 of 1280. ``roots >= B`` (or ``B = 1``) is a plain
    batch (``[]``); ``steps`` too few for one evaluation per batch size fall back to a
    plain batch with a warning. ``batch``, ``steps`` and ``roots`` are a checked plan's
    (:meth:`RenderPlan.validate`; ``roots``: :meth:`embedpin.config.RunConfig.validate`).
    """
    k, r = doublings(batch), doublings(roots)
    later = k - r  # doublings after step 0, at distinct steps in [1, steps - 2]
    if later <= 0:
        return []
    if steps - 2 < later:
        warnings.warn(f"{steps} steps are too few to branch a batch of {batch} from {roots} root(s) "
                      f"(needs > {later + 1}); rendering a plain batch instead", stacklevel=2)
        return []
    last = min(steps - 2, max(later, steps - 1 - max(1, steps // 8)))
    return [0] * r + [math.floor(j * last / later + 0.5) for j in range(1, later + 1)]


def batch_sizes(batch: int, schedule: list[int]) -> list[int]:
    """Latents per candidate at each depth: ``[1, 2, 4, .., B]`` (``[B]`` for a plain batch)."""
    sizes = [1 if schedule else batch]
    for _ in schedule:
        sizes.append(min(2 * sizes[-1], batch))
    return sizes


def lineage(batch: int, schedule: list[int]) -> torch.Tensor:
    """Each final image's ancestor at each depth: LongTensor [B, len(schedule) + 1].

    ``lineage[b, d]`` is the member (see module doc) that image ``b`` descends from at
    depth ``d``; the last column is ``arange(B)``. Because ``n_d`` divides ``n_{d+1}``
    except at the last, partial branch, the ancestor is simply ``b mod n_d``.
    """
    sizes = torch.tensor(batch_sizes(batch, schedule))
    return torch.arange(batch)[:, None] % sizes[None, :]


def unet_evaluations(batch: int, steps: int, schedule: list[int]) -> int:
    """Model evaluations of one candidate's latents for a one-evaluation-per-step sampler.

    Classifier-free guidance is NOT included: each evaluation here costs two UNet
    image-evaluations (unconditional + conditional half); ``render`` counts those. A plain
    batch costs ``B * steps``.
    """
    sizes = batch_sizes(batch, schedule)
    roots = sizes[sum(1 for v in schedule if v == 0)]  # step-0 copies are roots: their own evaluations
    later = [v for v in schedule if v > 0]
    edges = [0, *later, steps - 1]
    return roots + sum(n * (b - a) for n, a, b in zip(sizes[len(schedule) - len(later):], edges, edges[1:]))


@dataclass(frozen=True)
class Branch:
    """One doubling: row ``r`` of the new batch continues row ``parent[r]`` as member
    ``members[r]``; rows where ``copy`` is set are newly born (fresh noise stream)."""

    step: int
    parent: torch.Tensor  # LongTensor [n_new]
    members: tuple[int, ...]
    copy: torch.Tensor  # BoolTensor [n_new]


@dataclass(frozen=True)
class BranchPath:
    """How a candidate's rows evolve: the members they start as and the branches after.

    Branches at step 0 are taken before the first evaluation: their copies are roots
    (fresh initial noise from their own streams), so the path simply starts with them.
    """

    members: tuple[int, ...]
    branches: tuple[Branch, ...]

    @classmethod
    def starting(cls, members: tuple[int, ...], branches: tuple[Branch, ...]) -> BranchPath:
        while branches and branches[0].step == 0:
            members, branches = branches[0].members, branches[1:]
        return cls(members, branches)


def batch_path(batch: int, schedule: list[int]) -> BranchPath:
    """Rows of a whole hyperbatch (or a plain batch when ``schedule`` is empty)."""
    sizes = batch_sizes(batch, schedule)
    branches = tuple(
        Branch(s, torch.arange(m) % n, tuple(range(m)), torch.arange(m) >= n)
        for s, n, m in zip(schedule, sizes, sizes[1:])
    )
    return BranchPath.starting(tuple(range(sizes[0])), branches)


def image_path(row: torch.Tensor, schedule: list[int]) -> BranchPath:
    """The single row that replays one image with lineage ``row`` [len(schedule) + 1]."""
    r = [int(v) for v in row]
    branches = tuple(
        Branch(s, torch.zeros(1, dtype=torch.long), (b,), torch.tensor([b != a]))
        for s, a, b in zip(schedule, r, r[1:])
    )
    return BranchPath.starting((r[0],), branches)


def check_lineage_row(row: torch.Tensor, batch: int, schedule: list[int]) -> None:
    """Raise ConfigError unless ``row`` is a lineage row of this (batch, schedule)."""
    if row.dim() != 1 or len(row) != len(schedule) + 1:
        raise ConfigError(f"lineage row must have {len(schedule) + 1} entries for this plan, got "
                          f"{list(row.shape)}")
    image = int(row[-1])
    if not 0 <= image < batch or not torch.equal(row.cpu().long(), lineage(batch, schedule)[image]):
        raise ConfigError(f"lineage row {row.tolist()} does not belong to a batch of {batch} "
                          f"with branches at steps {schedule}")
