"""The multi-objective size limiter: MO-CMA-ES on (loss, distance from the plain prompt).

``deap.cma.StrategyMultiObjective`` (Voss, Hansen & Igel 2010, "Improved step size
adaptation for the MO-CMA-ES") keeps μ elitist parents, each with its own step size and
Cholesky factor; selection is by non-dominated sorting, ties broken by hypervolume
contribution. :class:`MOCMAES` wraps it with the same ask/tell + JSON-checkpoint
contract as :class:`~embedpin.optimizer.cmaes.CMAES`. The first :meth:`MOCMAES.ask`
returns the initial parents (x0 itself plus μ-1 points uniform within ``radius`` of it,
sd-prompt-pinning's "initial population radius") to be evaluated; later calls return λ
offspring. Defaults: μ = λ = ⌊4 + 3 ln N⌋, so every parent makes one offspring per
generation (DEAP's λ = 1 would render one candidate at a time). The chosen result is
the lowest loss seen with distance <= ``max_distance``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from deap import base, cma

from embedpin.errors import ConfigError, InputError
from embedpin.optimizer.cmaes import (
    Individual,
    as_individual,
    as_vector,
    check_format,
    default_population,
    is_real,
)
from embedpin.optimizer.rng import deap_rng, make_rng, rng_from_json, rng_to_json

STATE_FORMAT = "embedpin.mocmaes"
STATE_VERSION = 1
TUNABLE = ("d", "ptarg", "cp", "cc", "ccov", "pthresh")


class FitnessMin2(base.Fitness):
    """(loss, distance), both minimised."""

    weights = (-1.0, -1.0)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of ``points`` [N, k] (minimisation).

    Rows with a non-finite entry are never on the front; equal rows are all kept.
    """
    P = np.asarray(points, dtype=float)
    if P.ndim != 2:
        raise ValueError(f"pareto_front expects points [N, k], got shape {P.shape}")
    finite = np.all(np.isfinite(P), axis=1)
    le = np.all(P[:, None, :] <= P[None, :, :], axis=2)  # le[j, i]: j no worse than i
    lt = np.any(P[:, None, :] < P[None, :, :], axis=2)
    dominated = np.any(le & lt & finite[:, None], axis=0)
    return np.flatnonzero(finite & ~dominated)


class MOCMAES:
    """Ask/tell MO-CMA-ES on (loss, distance) with private randomness and JSON state."""

    def __init__(self, x0: np.ndarray, sigma0: float, seed: int, max_distance: float,
                 mu: int | None = None, lambda_: int | None = None, radius: float = 0.25,
                 **params: Any) -> None:
        x0 = as_vector(x0, "x0")
        for name, value in (("sigma0", sigma0), ("max_distance", max_distance)):
            if not (is_real(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not (is_real(radius) and radius >= 0):
            raise ConfigError(f"radius must be a non-negative number, got {radius!r}")
        unknown = sorted(set(params) - set(TUNABLE))
        bad = [k for k, v in params.items() if not is_real(v)]
        if unknown or bad:
            raise ConfigError(f"unknown or non-numeric MO-CMA-ES parameter(s): "
                              f"{', '.join(unknown + bad)}")
        mu = default_population(x0.size) if mu is None else int(mu)
        lam = mu if lambda_ is None else int(lambda_)
        if mu < 2 or lam < 1:
            raise ConfigError(f"MO-CMA-ES needs mu >= 2 and lambda >= 1, got {mu}, {lam}")
        self._config = {"max_distance": float(max_distance), "mu": mu, "lambda_": lam,
                        "radius": float(radius),
                        "params": {k: float(v) for k, v in params.items()}}
        self._rng = make_rng(seed)
        offsets = self._rng.uniform(-radius, radius, (mu - 1, x0.size))
        parents = [as_individual(x) for x in np.vstack([x0, x0 + offsets])]
        self._es = cma.StrategyMultiObjective(parents, float(sigma0), mu=mu, lambda_=lam,
                                              **self._config["params"])
        self._generation, self._evaluated = 0, False
        self._pending: list[int] | None = None  # parent index of each asked offspring
        self._last_X: np.ndarray | None = None
        self._best: dict[str, Any] | None = None

    def ask(self) -> np.ndarray:
        """Candidates to evaluate: the μ initial parents first, then λ offspring [λ, n]."""
        if not self._evaluated:
            X, self._pending = np.stack(self._es.parents), None
        else:
            with deap_rng(self._rng):
                offspring = self._es.generate(as_individual)
            X, self._pending = np.stack(offspring), [int(o._ps[1]) for o in offspring]
        self._last_X = X.copy()
        return X

    def tell(self, X: np.ndarray, losses: np.ndarray, distances: np.ndarray | None = None) -> None:
        """Update from the last asked ``X`` and its ``losses``/``distances`` (NaN = worst)."""
        if distances is None:
            raise ValueError("MOCMAES.tell needs the distances, its second objective")
        X = np.array(X, dtype=float)
        F = np.stack([np.asarray(losses, float).reshape(-1),
                      np.asarray(distances, float).reshape(-1)], axis=1)
        if self._last_X is None or not np.array_equal(X, self._last_X):
            raise ValueError("MOCMAES.tell must receive the X of the last ask(), unchanged")
        if F.shape != (len(X), 2):
            raise ValueError(f"tell expects {len(X)} losses and distances, got {F.shape}")
        self._track_best(X, F)
        F = self._fill_nonfinite(F)
        if not self._evaluated:
            for parent, f in zip(self._es.parents, F):
                parent.fitness = FitnessMin2(tuple(f))
            self._evaluated = True
        else:
            population = [self._offspring(x, f, p) for x, f, p in zip(X, F, self._pending)]
            with deap_rng(self._rng):
                self._es.update(population)
            self._generation += 1
        self._last_X, self._pending = None, None

    @staticmethod
    def _offspring(x: np.ndarray, f: np.ndarray, parent: int) -> Individual:
        """An evaluated offspring tagged with its parent, as DEAP's update expects."""
        ind = as_individual(x, FitnessMin2(tuple(f)))
        ind._ps = "o", parent
        return ind

    def _fill_nonfinite(self, F: np.ndarray) -> np.ndarray:
        """Non-finite objectives become worse than every finite one (parents included)."""
        known = np.vstack([F] + ([self._parent_objectives()] if self._evaluated else []))
        known = np.where(np.isfinite(known), known, -np.inf)
        worst = np.max(known, axis=0)
        worst = np.where(np.isfinite(worst), worst, 0.0)
        fill = worst + np.maximum(1.0, np.abs(worst))
        return np.where(np.isfinite(F), F, fill)

    def _track_best(self, X: np.ndarray, F: np.ndarray) -> None:
        """Remember the lowest finite loss with distance <= max_distance."""
        ok = np.isfinite(F[:, 0]) & (F[:, 1] <= self._config["max_distance"])
        if not ok.any():
            return
        i = int(np.flatnonzero(ok)[np.argmin(F[ok, 0])])
        if self._best is None or F[i, 0] < self._best["loss"]:
            self._best = {"x": X[i].tolist(), "loss": float(F[i, 0]),
                          "distance": float(F[i, 1])}

    def _parent_objectives(self) -> np.ndarray:
        """(loss, distance) of the current parents [μ, 2]."""
        return np.array([p.fitness.values for p in self._es.parents], dtype=float)

    def front(self) -> tuple[np.ndarray, np.ndarray]:
        """The parents' Pareto front: X [k, n] and (loss, distance) [k, 2], by distance."""
        if not self._evaluated:
            return np.zeros((0, self.n)), np.zeros((0, 2))
        F = self._parent_objectives()
        idx = pareto_front(F)
        idx = idx[np.argsort(F[idx, 1], kind="stable")]
        return np.stack(self._es.parents)[idx], F[idx]

    @property
    def best(self) -> tuple[np.ndarray, float, float] | None:
        """(x, loss, distance) of the lowest loss within ``max_distance``, or None."""
        if self._best is None:
            return None
        b = self._best
        return np.array(b["x"], dtype=float), b["loss"], b["distance"]

    @property
    def n(self) -> int:
        """Search dimension."""
        return int(self._es.dim)

    @property
    def mu(self) -> int:
        """Parents kept (also the size of the first, initial ask)."""
        return int(self._config["mu"])

    @property
    def lambda_(self) -> int:
        """Offspring per generation."""
        return int(self._config["lambda_"])

    @property
    def sigmas(self) -> np.ndarray:
        """Each parent's step size [μ]."""
        return np.array(self._es.sigmas, dtype=float)

    @property
    def sigma(self) -> float:
        """Mean of the parents' step sizes."""
        return float(np.mean(self._es.sigmas))

    @property
    def generation(self) -> int:
        """Completed offspring generations (the initial evaluation is not counted)."""
        return self._generation

    def should_stop(self, tol_fun: float = 0.0, tol_x: float = 0.0) -> str | None:
        """Never: the front keeps improving until the generation budget is spent."""
        return None

    def spread(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre [n], standard deviation [n]) per coordinate of the lowest-loss parent's
        distribution N(x_k, σ_k² A_k A_kᵀ) (each parent has its own; the front's low-loss end is
        what the pinned result comes from)."""
        es = self._es
        k = int(np.argmin(self._parent_objectives()[:, 0])) if self._evaluated else 0
        A = np.asarray(es.A[k], dtype=float)
        return np.asarray(es.parents[k], dtype=float).copy(), float(es.sigmas[k]) * np.sqrt((A * A).sum(1))

    def stats(self) -> dict[str, Any]:
        """What a run records per generation: sigma (the parents' mean), the Pareto front as
        [{loss, distance}] by distance; no single distribution, so no axis ratio or mean."""
        _, F = self.front()
        return {"sigma": self.sigma, "axis_ratio": None, "eigenvalues": [], "mean": None,
                "front": [{"loss": float(f[0]), "distance": float(f[1])} for f in F]}

    def to_state(self) -> dict[str, Any]:
        """The dynamic state (parents with objectives, per-parent σ, A, A⁻¹, p_c, p_succ)."""
        es = self._es
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, **self._config,
            "parents": np.stack(es.parents).tolist(),
            "objectives": self._parent_objectives().tolist() if self._evaluated else None,
            "sigmas": [float(s) for s in es.sigmas], "psucc": [float(p) for p in es.psucc],
            "A": [a.tolist() for a in es.A], "inv_cholesky": [a.tolist() for a in es.invCholesky],
            "pc": [p.tolist() for p in es.pc], "generation": self._generation,
            "rng": rng_to_json(self._rng), "best": self._best,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MOCMAES:
        """Rebuild from :meth:`to_state`; continuing is bitwise identical."""
        check_format(state, STATE_FORMAT, STATE_VERSION)
        try:
            X = np.array(state["parents"], dtype=float)
            self = cls(X[0], float(state["sigmas"][0]), 0, state["max_distance"],
                       state["mu"], state["lambda_"], state["radius"], **state["params"])
            self._restore(state, X)
        except (KeyError, TypeError, ValueError, IndexError, ConfigError) as exc:
            raise InputError(f"malformed MO-CMA-ES checkpoint: {exc}") from None
        return self

    def _restore(self, state: dict[str, Any], X: np.ndarray) -> None:
        """Overwrite the freshly built strategy's dynamic state with ``state``'s."""
        es, mu, n = self._es, len(X), self.n
        shapes = {"sigmas": (mu,), "psucc": (mu,), "A": (mu, n, n),
                  "inv_cholesky": (mu, n, n), "pc": (mu, n)}
        arrays = {k: np.array(state[k], dtype=float) for k in shapes}
        if X.shape != (mu, n) or any(arrays[k].shape != s for k, s in shapes.items()):
            raise ValueError("inconsistent array shapes")
        es.parents = [as_individual(x) for x in X]
        if state["objectives"] is not None:
            for parent, f in zip(es.parents, np.array(state["objectives"], dtype=float)):
                parent.fitness = FitnessMin2(tuple(f))
            self._evaluated = True
        es.sigmas = [float(s) for s in arrays["sigmas"]]
        es.psucc = [float(p) for p in arrays["psucc"]]
        es.A = [a.copy() for a in arrays["A"]]
        es.invCholesky = [a.copy() for a in arrays["inv_cholesky"]]
        es.pc = [p.copy() for p in arrays["pc"]]
        self._generation, self._best = int(state["generation"]), state["best"]
        self._rng = rng_from_json(state["rng"])
