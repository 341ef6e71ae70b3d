"""Per-member noise streams: where every random number of a render comes from.

Each lineage member (see ``schedule``) owns one ``torch.Generator`` seeded from
``(plan.seed, member)``; the member index fixes the depth it is born at, so this is
the seed of that branch. Its stream is its birth draw (the initial noise of a root or
plain member, the re-noise of a copy), then ``draws`` latents per step it is alive.
All candidates share the members' streams (common random numbers: candidates differ
only by their conditioning), and a member's noise depends only on (seed, member,
step), so replaying one image's path draws exactly what the hyperbatch drew for it.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(seed: int, *path: int) -> int:
    """A well-mixed 63-bit seed for the branch ``path`` of ``seed`` (numpy's SeedSequence: distinct
    paths give independent streams). The one seed mixer of a run: noise members here, search and
    validation seeds in ``evaluation.seeds``."""
    return int(np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def member_seed(seed: int, member: int) -> int:
    """The seed of lineage member ``member``'s noise stream."""
    return derived_seed(seed, member)


def member_seeds(seed: int, lineage: torch.Tensor) -> torch.Tensor:
    """Seeds of every member in a lineage tensor, same shape, int64."""
    members = lineage.unique().tolist()
    table = torch.tensor([member_seed(seed, m) for m in members], dtype=torch.long)
    return table[torch.searchsorted(torch.tensor(members), lineage)]


class NoiseStreams:
    """Generators of the members born so far, drawing latents of ``shape`` on ``device``."""

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device):
        self.seed, self.shape, self.device = seed, tuple(shape), device
        self.generators: dict[int, torch.Generator] = {}

    def _draw(self, member: int, n: int) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=self.generators[member], device=self.device)

    def birth(self, members: list[int] | tuple[int, ...]) -> torch.Tensor:
        """Start the members' streams; their birth draws [len(members), *shape]."""
        for m in members:
            self.generators[m] = torch.Generator(device=self.device).manual_seed(member_seed(self.seed, m))
        return torch.stack([self._draw(m, 1)[0] for m in members]) if members else \
            torch.empty((0, *self.shape), device=self.device)

    def step(self, members: list[int] | tuple[int, ...], draws: int) -> torch.Tensor:
        """One step's draws of each (living) member: [len(members), draws, *shape]."""
        return torch.stack([self._draw(m, draws) for m in members])
