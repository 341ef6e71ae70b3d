"""Private randomness for DEAP, which samples from numpy's *global* RNG.

DEAP's strategies call ``numpy.random.standard_normal`` / ``randn`` / ``randint``.
:func:`deap_rng` is the one place where embedpin lends them a private
``numpy.random.RandomState``: it swaps that state in, runs the DEAP call, takes the
advanced state back and restores the caller's global state, so library code neither
depends on nor disturbs ``numpy.random``'s global state. The private state is plain
JSON (:func:`rng_to_json` / :func:`rng_from_json`) and goes into checkpoints.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from embedpin.errors import ConfigError, InputError

_SWAP_LOCK = threading.RLock()  # the global state is process-wide: one swap at a time


def make_rng(seed: int) -> np.random.RandomState:
    """A private legacy ``RandomState`` (MT19937, seeded through ``SeedSequence``)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.RandomState(np.random.MT19937(int(seed)))


@contextmanager
def deap_rng(rng: np.random.RandomState) -> Iterator[None]:
    """Run the body with ``rng``'s state as numpy's global state, then swap back.

    On exit ``rng`` holds the advanced state and the global state is exactly what it
    was before, even if the body raised.
    """
    with _SWAP_LOCK:
        saved = np.random.get_state()
        np.random.set_state(rng.get_state())
        try:
            yield
        finally:
            rng.set_state(np.random.get_state())
            np.random.set_state(saved)


def rng_to_json(rng: np.random.RandomState) -> dict[str, Any]:
    """The full MT19937 state (key, position, cached Gaussian) as JSON types."""
    name, key, pos, has_gauss, cached = rng.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def rng_from_json(state: dict[str, Any]) -> np.random.RandomState:
    """Inverse of :func:`rng_to_json`; a malformed state raises :class:`InputError`."""
    try:
        key = np.asarray(state["key"], dtype=np.uint32)
        legacy = (str(state["bit_generator"]), key, int(state["pos"]),
                  int(state["has_gauss"]), float(state["cached_gaussian"]))
        rng = np.random.RandomState(np.random.MT19937(0))
        rng.set_state(legacy)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"malformed RNG state in checkpoint: {exc}") from None
    return rng
