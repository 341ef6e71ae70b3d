"""Where a run's render seeds come from: search seeds per generation, validation seeds once.

A render plan's seed names its members' noise streams (``render.noise``). The search
renders generation g with ``search_seed``: the run's seed itself in every generation
(``fixed``: common random numbers across generations) or a fresh seed per generation
(``rotate``: the search meets new noise every generation, so the distribution's mean
averages over many noise samples instead of fitting a few). Validation renders use
``validation_seed``, drawn from another branch of the run seed's ``SeedSequence`` tree, so
its streams are disjoint from every search stream. All are pure functions of the run's
seed: a resumed run renders exactly what an uninterrupted one would.
"""

from __future__ import annotations

from embedpin.render.noise import derived_seed

SEARCH, VALIDATION = 1, 2  # SeedSequence branches of the run seed


def search_seed(seed: int, generation: int, schedule: str = "rotate") -> int:
    """The plan seed of generation ``generation``'s search renders."""
    return int(seed) if schedule == "fixed" else derived_seed(seed, SEARCH, generation)


def validation_seed(seed: int) -> int:
    """The plan seed of every validation render of the run (plain batches)."""
    return derived_seed(seed, VALIDATION)
