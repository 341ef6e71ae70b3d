"""What crosses between the driver and whoever renders: small, numpy-only, picklable records.

The driver (optimizer, seeds, run store, reports) and the owner of the heavy objects (a
``Session``, in this process or in a Ray worker) exchange only these:

- driver -> worker: standardized candidates X [k, n] and a ``RenderPlan`` (its seed fixed by the
  driver, ``evaluation.seeds``);
- worker -> driver: a :class:`Batch` per chunk of candidates (losses, per-image losses, decoded
  parameters, distances, uint8 images, lineage and seeds), :class:`RunInfo` once,
  :class:`Starts` once (the inversion stage's) and :class:`Pinned` tensors for the candidate a
  generation pins.

A candidate's figures depend only on (its x, the plan): chunks rendered anywhere are put back
together in candidate order by :meth:`Batch.concat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class RunInfo:
    """What the driver needs to know of a run's loaded model and search, from whoever loaded them:
    the run config with the model's defaults and the render size filled in (``RunConfig.to_dict``;
    what config.toml keeps), the search space's JSON description, the model family and text
    encoder widths (a pinned file's recipe), how many image towers it has, the notes on what the
    setup means for the result, the device the renders run on and the labels of the prompt's
    tokens (placeholders included; one per token weight)."""

    config: dict
    space: dict
    family: str
    widths: list[int]
    towers: int
    notes: list[str]
    device: str
    tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Starts:
    """The search's possible starts, from the inversion stage: ``vectors`` [1 + K, N, Din] (the run's
    init vectors, then the token vectors at K points of their fit, its end last) and ``steps``, the
    fit's step each was kept after (0: the init vectors)."""

    vectors: np.ndarray
    steps: tuple[int, ...]

    def __post_init__(self):
        assert len(self.vectors) == len(self.steps), (self.vectors.shape, self.steps)


@dataclass
class Pinned:
    """One candidate's conditioning as a pinned result holds it (``Conditioning.tensors``: CPU
    float32) and its CFG scale."""

    tensors: dict[str, torch.Tensor]
    cfg: float


def _cat(parts: list, name: str):
    values = [getattr(p, name) for p in parts]
    return None if values[0] is None else np.concatenate(values)


@dataclass
class Batch:
    """k candidates rendered on one plan and scored.

    loss [k] float64 (what the optimizer is told); flip / clip [k] float32 (each term's batch mean,
    None when unused); per_image [k, B] float32; distance [k] float64 (from the plain prompt);
    params {block: [k, size]} float64 (decoded); images uint8 [k, B, H, W, 3] (as the PNGs store
    them); lineage and seeds [B, depth] int64 (the plan's, shared by all candidates); unet_evals:
    UNet image evaluations spent; seconds: rendering and scoring time per worker; worker [k]: who
    rendered each candidate.
    """

    loss: np.ndarray
    flip: np.ndarray | None
    clip: np.ndarray | None
    per_image: np.ndarray
    distance: np.ndarray
    params: dict[str, np.ndarray]
    images: np.ndarray
    lineage: np.ndarray
    seeds: np.ndarray
    unet_evals: int
    seconds: dict[str, float] = field(default_factory=dict)
    worker: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what moves when a worker hands the batch back; pickling adds little)."""
        arrays = [self.loss, self.flip, self.clip, self.per_image, self.distance, self.images, self.lineage,
                  self.seeds, *self.params.values()]
        return sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def concat(cls, parts: list[Batch]) -> Batch:
        """Chunks in candidate order -> one batch. The chunks share their plan, hence lineage and seeds."""
        if not parts:
            raise ValueError("no chunks to put together")
        first = parts[0]
        if any(not np.array_equal(p.lineage, first.lineage) or not np.array_equal(p.seeds, first.seeds)
               for p in parts):
            raise ValueError("chunks rendered on different plans")
        seconds: dict[str, float] = {}
        for p in parts:
            for name, s in p.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + s
        return cls(loss=_cat(parts, "loss"), flip=_cat(parts, "flip"), clip=_cat(parts, "clip"),
                   per_image=_cat(parts, "per_image"), distance=_cat(parts, "distance"),
                   params={k: np.concatenate([p.params[k] for p in parts]) for k in first.params},
                   images=_cat(parts, "images"), lineage=first.lineage, seeds=first.seeds,
                   unet_evals=sum(p.unet_evals for p in parts), seconds=seconds,
                   worker=[w for p in parts for w in p.worker])
