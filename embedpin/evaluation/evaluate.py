"""Evaluators: where a generation's candidates are rendered and scored.

The run loop (``embedpin.runner``) asks an evaluator for

- ``evaluate(X, plan, label)``: candidates X [k, n] rendered on ``plan`` and scored -> a
  :class:`~embedpin.evaluation.batch.Batch` in candidate order;
- ``evaluate_plain(plan)``: the plain prompt on ``plan`` (the validation reference);
- ``pinned(x)``: the conditioning of candidate x (None: the plain prompt) as a pinned file holds it;
- ``invert(progress)``: the search's possible starts [1 + K, N, Din] (the init vectors, then
  points of the token vectors' fit to the targets by gradient; None where the run does not
  invert), and ``use_vectors(v)``: the search's x = 0 puts the token vectors at v;

and reads ``info`` (:class:`~embedpin.evaluation.batch.RunInfo`), ``workers`` (None in-process; else
per-worker counts) and ``alive()``; it may set ``notify``, where an evaluator says what happened
to its workers (one line each). Every plan, seed included, comes from the driver, so a
candidate's figures do not depend on where it was rendered.

:class:`LocalEvaluator` runs a ``Session`` in this process; ``evaluation.ray_workers.RayEvaluator``
runs one ``Session`` per Ray worker (imported only for ``--workers`` / ``--ray-address``: the core
never imports Ray). Both go through ``Session.batch``, the same compact path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from embedpin.config import RunConfig, ScaleConfig
from embedpin.errors import ConfigError
from embedpin.evaluation.batch import Batch, Pinned, RunInfo, Starts
from embedpin.evaluation.session import Session
from embedpin.render.sampler import RenderPlan


class Evaluator(Protocol):
    info: RunInfo
    workers: list[dict] | None
    device: str  # where the driver computes its report figures (error maps)
    notify: Callable[[str], None]

    def evaluate(self, X: np.ndarray, plan: RenderPlan, label: str = "") -> Batch: ...
    def evaluate_plain(self, plan: RenderPlan) -> Batch: ...
    def pinned(self, x: np.ndarray | None) -> Pinned: ...
    def invert(self, progress: Callable[[int, float], None] | None = None) -> Starts | None: ...
    def use_vectors(self, vectors: np.ndarray | None) -> None: ...
    def alive(self) -> tuple[int, int]: ...
    def close(self) -> None: ...


class LocalEvaluator:
    """Renders in this process, on the session's device."""

    workers = None

    def notify(self, message: str) -> None:
        pass

    def __init__(self, session: Session):
        self.session = session
        self.info = session.info()
        self.device = self.info.device

    def evaluate(self, X: np.ndarray, plan: RenderPlan, label: str = "") -> Batch:
        return self.session.batch(X, plan)

    def evaluate_plain(self, plan: RenderPlan) -> Batch:
        return self.session.plain_batch(plan)

    def pinned(self, x: np.ndarray | None) -> Pinned:
        return self.session.pinned(x)

    def invert(self, progress: Callable[[int, float], None] | None = None) -> Starts | None:
        return self.session.invert(progress) if self.session.config.inverts() else None

    def use_vectors(self, vectors: np.ndarray | None) -> None:
        self.session.use_vectors(vectors)

    def alive(self) -> tuple[int, int]:
        return 1, 1

    def close(self) -> None:
        pass


def open_evaluator(config: RunConfig, scale: ScaleConfig, notify: Callable[[str], None] | None = None,
                   components=None) -> Evaluator:
    """In-process, or Ray workers when ``scale`` asks for them (``--workers``, ``--ray-address``;
    ``notify``: where they say what happens to them); ``components``: in-process with a model
    already loaded. A user mistake in the config (a missing target, a bad model) raises here,
    before any run folder exists."""
    if scale.validate().distributed:
        if components is not None:
            raise ConfigError("a model loaded in this process renders here: it cannot go to Ray workers")
        try:
            from embedpin.evaluation.ray_workers import RayEvaluator
        except ImportError as e:
            if "ray" not in str(e.name or ""):
                raise
            raise ConfigError("--workers / --ray-address need Ray: pip install 'embedpin[ray]'") from None

        return RayEvaluator(config, scale, notify)
    return LocalEvaluator(Session.prepare(config, components))
