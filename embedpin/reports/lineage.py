"""Which images of a hyperbatch share a trunk, as group ids and colours for the page.

A candidate's B images start as one latent that branches at k depths; image j's
lineage row holds one int per depth. Images whose rows agree on the first d+1 entries
share their trunk up to branch d, so they get the same group id (and colour) at depth d.
"""

from __future__ import annotations

import numpy as np

from embedpin.errors import InputError

GOLDEN_ANGLE = 137.50776405  # degrees; consecutive group ids get well-separated hues


def trunk_groups(lineage: np.ndarray) -> np.ndarray:
    """Lineage ``[B, k]`` ints -> group ids ``[B, k]``.

    ``groups[i, d] == groups[j, d]`` iff ``lineage[i, :d+1] == lineage[j, :d+1]``; ids
    count distinct prefixes at each depth in lexicographic order, from 0.
    """
    lineage = np.asarray(lineage)
    b, k = lineage.shape
    if b == 0 or k == 0:
        return np.zeros((b, k), dtype=np.int64)
    order = np.lexsort(lineage.T[::-1])
    ordered = lineage[order]
    differs = np.logical_or.accumulate(ordered[1:] != ordered[:-1], axis=1)  # prefix differs by depth
    ids = np.concatenate([np.zeros((1, k), np.int64), np.cumsum(differs, axis=0)], axis=0)
    groups = np.empty_like(ids)
    groups[order] = ids
    return groups


def lineage_array(rows: list | None, batch: int) -> np.ndarray:
    """A store's ``lineage`` list -> ``[B, k]`` int array (``[B, 0]`` when absent)."""
    if not rows:
        return np.zeros((batch, 0), dtype=np.int64)
    try:
        arr = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError):
        raise InputError("malformed lineage: expected one list of ints of equal length per image") from None
    if arr.ndim != 2 or arr.shape[0] != batch:
        raise InputError(f"malformed lineage: expected {batch} rows of ints, got shape {list(arr.shape)}")
    return arr


def group_colours(groups: np.ndarray) -> list[list[str]]:
    """Group ids ``[B, k]`` -> CSS colours ``[B][k]`` (hue by id, lighter at deeper branches)."""
    hue = (groups * GOLDEN_ANGLE + 200.0) % 360.0
    light = 38 + 30 * np.arange(groups.shape[1]) / max(groups.shape[1], 1)
    light = np.broadcast_to(light, groups.shape)
    return [[f"hsl({h:.0f} 70% {ll:.0f}%)" for h, ll in zip(hr, lr)] for hr, lr in zip(hue, light)]
