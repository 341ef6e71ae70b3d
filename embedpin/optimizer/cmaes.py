"""CMA-ES with an ask/tell interface and a JSON checkpoint, built on ``deap.cma.Strategy``.

Defaults (sd-prompt-pinning's table; N = search dimension, all in embedpin's *normalised* space
where x = 0 is the plain prompt and one unit of x is one ``Block.scale`` of change):

========================  ==============================  ===========================
population λ              ``int(4 + 3 ln N)``             :func:`default_population`
parents μ                 ``λ // 2`` (superlinear weights)
generations               ``16 · ⌊ln N⌋`` (at least 16)    :func:`default_generations`
========================  ==============================  ===========================

The seed's "initial population STD 0.05" is in raw embedding units; here ``sigma0`` is in
block-scale units, so sigma0 ≈ 0.5-1 explores about ±1 ``Block.scale`` around x0.

DEAP supplies the sampling (``generate``), the ranking (``deap.base.Fitness``) and the
parameter skeleton; :class:`_Strategy` updates it to the current recommendations of
Hansen, "The CMA Evolution Strategy: A Tutorial" (arXiv:1604.00772, 2016): learning rates
of eqs. (55)-(58) and the active covariance update with negative weights, eqs. (46)-(47)
and (53). ``active=False`` turns the negative weights off.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from deap import base, cma

from embedpin.config import POLISH_GENERATIONS as POLISH_GENERATIONS  # (re-exported: the runner reads it here)
from embedpin.errors import ConfigError, InputError
from embedpin.optimizer.rng import deap_rng, make_rng, rng_from_json, rng_to_json

STATE_FORMAT = "embedpin.cmaes"
STATE_VERSION = 1
TUNABLE = ("mu", "weights", "cs", "damps", "ccum", "ccov1", "ccovmu", "active")


def default_population(n: int) -> int:
    """λ = ⌊4 + 3 ln N⌋ (sd-prompt-pinning, DEAP and pycma default)."""
    return int(4 + 3 * math.log(n))




def default_generations(n: int) -> int:
    """16 · ⌊ln N⌋ generations (sd-prompt-pinning's default); at least 16, the formula gives 0 for N < 3."""
    return max(16, 16 * int(math.floor(math.log(n))))


class FitnessMin(base.Fitness):
    """A single minimised loss."""

    weights = (-1.0,)


def _raw_weights(kind: str, mu: int, lam: int) -> np.ndarray:
    """Unnormalised recombination weights for ranks 1..λ; ranks > μ come out ≤ 0."""
    ranks = np.arange(1, lam + 1, dtype=float)
    if kind == "superlinear":
        return math.log(mu + 0.5) - np.log(ranks)
    if kind == "linear":
        return mu + 0.5 - ranks
    if kind == "equal":
        return np.where(ranks <= mu, 1.0, -1.0)
    raise ConfigError(f"unknown CMA-ES weights {kind!r} (superlinear, linear, equal)")


class _Strategy(cma.Strategy):
    """``deap.cma.Strategy`` with 2016 learning rates and the active (negative) update."""

    def computeParams(self, params: dict[str, Any]) -> None:  # noqa: N802 (DEAP's name)
        """Weights and learning rates, Hansen 2016 eqs. (53)-(58)."""
        n, lam = float(self.dim), self.lambda_
        self.mu = int(params.get("mu", lam // 2))
        if not 1 <= self.mu <= lam:
            raise ConfigError(f"CMA-ES mu must be in [1, lambda={lam}], got {self.mu}")
        raw = _raw_weights(params.get("weights", "superlinear"), self.mu, lam)
        self.weights = raw[: self.mu] / raw[: self.mu].sum()
        self.mueff = 1.0 / float(np.sum(self.weights**2))
        mueff = self.mueff
        self.cc = params.get("ccum", (4 + mueff / n) / (n + 4 + 2 * mueff / n))
        self.cs = params.get("cs", (mueff + 2) / (n + mueff + 5))
        self.ccov1 = params.get("ccov1", 2 / ((n + 1.3) ** 2 + mueff))
        cmu = 2 * (0.25 + mueff + 1 / mueff - 2) / ((n + 2) ** 2 + mueff)
        self.ccovmu = min(1 - self.ccov1, params.get("ccovmu", cmu))
        damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.damps = params.get("damps", damps)
        self.neg_weights = self._negative_weights(raw[self.mu:], bool(params.get("active", True)))

    def _negative_weights(self, raw_neg: np.ndarray, active: bool) -> np.ndarray:
        """Weights of ranks μ+1..λ for the active update, eq. (53); zeros when off."""
        total = float(np.abs(raw_neg).sum())
        if not active or total == 0.0 or self.ccovmu <= 0.0:
            return np.zeros_like(raw_neg)
        mueff_neg = raw_neg.sum() ** 2 / np.sum(raw_neg**2)
        alpha = min(1 + self.ccov1 / self.ccovmu,
                    1 + 2 * mueff_neg / (self.mueff + 2),
                    (1 - self.ccov1 - self.ccovmu) / (self.dim * self.ccovmu))
        return max(alpha, 0.0) * raw_neg / total

    def update(self, population: list) -> None:
        """One generation from evaluated individuals (any order), eqs. (39)-(47)."""
        ranked = sorted(population, key=lambda ind: ind.fitness, reverse=True)  # best first
        X = np.asarray(ranked, dtype=float)
        old = self.centroid
        self.centroid = self.weights @ X[: self.mu]
        c_diff = self.centroid - old
        z_diff = (self.B.T @ c_diff) / self.diagD  # D^-1 B^T (m' - m): C^-1/2 in eigenbasis
        self.ps = (1 - self.cs) * self.ps + math.sqrt(
            self.cs * (2 - self.cs) * self.mueff) / self.sigma * (self.B @ z_diff)
        ps_norm = float(np.linalg.norm(self.ps))
        bias = math.sqrt(1 - (1 - self.cs) ** (2 * (self.update_count + 1)))
        hsig = float(ps_norm / bias / self.chiN < 1.4 + 2 / (self.dim + 1))
        self.update_count += 1
        self.pc = (1 - self.cc) * self.pc + hsig * math.sqrt(
            self.cc * (2 - self.cc) * self.mueff) / self.sigma * c_diff
        self.C = self._covariance(X, old, hsig)
        self.sigma *= math.exp((ps_norm / self.chiN - 1) * self.cs / self.damps)
        self._decompose()

    def _covariance(self, X: np.ndarray, old: np.ndarray, hsig: float) -> np.ndarray:
        """Rank-one + rank-μ update, negative weights rescaled by n/‖C^-1/2 y‖², eq. (46)."""
        Y = (X - old) / self.sigma  # [λ, n], ranked
        w = np.concatenate([self.weights, self.neg_weights])
        norms2 = np.sum(((Y @ self.B) / self.diagD) ** 2, axis=1)
        w_circ = np.where(w < 0, w * self.dim / np.maximum(norms2, 1e-300), w)
        delta = (1 - hsig) * self.cc * (2 - self.cc)
        decay = 1 + self.ccov1 * delta - self.ccov1 - self.ccovmu * float(w.sum())
        C = decay * self.C + self.ccov1 * np.outer(self.pc, self.pc) \
            + self.ccovmu * (w_circ * Y.T) @ Y
        return (C + C.T) / 2

    def _decompose(self) -> None:
        """B, D (ascending) and BD from C, exactly as DEAP's constructor derives them."""
        diagD, B = np.linalg.eigh(self.C)
        order = np.argsort(diagD)
        self.diagD = np.maximum(diagD[order], 0.0) ** 0.5
        self.B = B[:, order]
        self.BD = self.B * self.diagD
        self.cond = float(diagD[order[-1]] / diagD[order[0]])


class CMAES:
    """Ask/tell CMA-ES (minimisation) with private randomness and a JSON checkpoint.

    ``x0`` [n] is the initial mean, ``sigma0`` > 0 the initial step size, ``seed`` the
    private RNG seed; ``params`` override ``mu``, ``weights`` ("superlinear", "linear",
    "equal"), ``cs``, ``damps``, ``ccum``, ``ccov1``, ``ccovmu`` (DEAP's names) and
    ``active`` (negative weights, default on).
    """

    def __init__(self, x0: np.ndarray, sigma0: float, seed: int,
                 lambda_: int | None = None, **params: Any) -> None:
        x0 = as_vector(x0, "x0")
        if not (is_real(sigma0) and sigma0 > 0):
            raise ConfigError(f"sigma0 must be a positive number, got {sigma0!r}")
        lam = default_population(x0.size) if lambda_ is None else int(lambda_)
        if lam < 2:
            raise ConfigError(f"population (lambda) must be at least 2, got {lambda_!r}")
        self._params = _tunables(params)
        self._rng = make_rng(seed)
        self._es = _Strategy(x0, float(sigma0), lambda_=lam, **self._params)
        self._best_history: list[float] = []
        self._last_range = math.inf

    def ask(self) -> np.ndarray:
        """λ new candidates, float64 [λ, n]; advances the private RNG."""
        with deap_rng(self._rng):
            rows = self._es.generate(np.array)  # DEAP draws from the swapped-in RNG
        return np.stack(rows)

    def tell(self, X: np.ndarray, losses: np.ndarray, distances: np.ndarray | None = None) -> None:
        """Update from candidates ``X`` [λ, n] and their ``losses`` [λ] (NaN/inf = worst);
        ``distances`` is the multi-objective strategy's second objective, unused here.

        ``X`` is normally the last :meth:`ask`; checkpoint (:meth:`to_state`) after tell.
        """
        X = np.array(X, dtype=float)  # a copy: nothing of the caller's is touched or sorted
        losses = np.array(losses, dtype=float).reshape(-1)
        if X.shape != (self.lambda_, self.n) or losses.shape != (self.lambda_,):
            raise ValueError(f"tell expects X [{self.lambda_}, {self.n}] and losses "
                             f"[{self.lambda_}], got {X.shape} and {losses.shape}")
        losses = np.where(np.isfinite(losses), losses, np.inf)
        population = [as_individual(x, FitnessMin((f,))) for x, f in zip(X, losses)]
        with deap_rng(self._rng):
            self._es.update(population)
        self._record(losses)

    def _record(self, losses: np.ndarray) -> None:
        """Keep the recent best losses for the ``tol_fun`` test (pycma's window)."""
        window = 10 + math.ceil(30 * self.n / self.lambda_)
        self._best_history = (self._best_history + [float(losses.min())])[-window:]
        self._last_range = float(losses.max() - losses.min())

    def should_stop(self, tol_fun: float = 1e-11, tol_x: float = 1e-11,
                    max_condition: float = 1e14) -> str | None:
        """Why to stop ("tol_fun", "tol_x", "condition") or None (pycma's criteria).

        tol_fun: the last generation's losses and the recent best losses each span less
        than ``tol_fun``. tol_x: every coordinate of σ·p_c and σ·sqrt(diag C) is below
        ``tol_x``. condition: the condition number of C exceeds ``max_condition``.
        """
        if self.generation == 0:
            return None
        hist = self._best_history
        if self._last_range < tol_fun and max(hist) - min(hist) < tol_fun:
            return "tol_fun"
        es = self._es
        spread = es.sigma * np.maximum(np.abs(es.pc), np.sqrt(np.diag(es.C)))
        if np.all(spread < tol_x):
            return "tol_x"
        if self.axis_ratio**2 > max_condition:
            return "condition"
        return None

    @property
    def n(self) -> int:
        """Search dimension."""
        return int(self._es.dim)

    @property
    def lambda_(self) -> int:
        """Candidates per generation."""
        return int(self._es.lambda_)

    @property
    def mu(self) -> int:
        """Parents recombined into the mean."""
        return int(self._es.mu)

    @property
    def sigma(self) -> float:
        """Current global step size."""
        return float(self._es.sigma)

    @property
    def mean(self) -> np.ndarray:
        """Current distribution mean [n] (a copy)."""
        return np.array(self._es.centroid, dtype=float)

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of C, ascending [n]."""
        return self._es.diagD**2

    @property
    def axis_ratio(self) -> float:
        """Longest over shortest principal axis of the distribution (sqrt of cond C)."""
        d = self._es.diagD
        return float(d[-1] / d[0]) if d[0] > 0 else math.inf

    @property
    def generation(self) -> int:
        """Number of completed ``tell`` calls."""
        return int(self._es.update_count)

    def spread(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre [n], standard deviation [n]) of the search distribution N(m, σ²C) along each
        coordinate: σ·sqrt(C_ii) (how tightly the search holds each parameter)."""
        es = self._es
        return np.asarray(es.centroid, dtype=float).copy(), float(es.sigma) * np.sqrt(np.diag(es.C))

    def stats(self) -> dict[str, Any]:
        """What a run records per generation: sigma, axis_ratio, eigenvalues [n], the mean
        [n] (the distribution's centre, decodable as a candidate) and front (None: one objective)."""
        return {"sigma": self.sigma, "axis_ratio": self.axis_ratio, "eigenvalues": self.eigenvalues.tolist(),
                "mean": self.mean, "front": None}

    def to_state(self) -> dict[str, Any]:
        """The dynamic state as JSON types; B, D and learning rates are rebuilt on load."""
        es = self._es
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "lambda_": self.lambda_, "params": dict(self._params),
            "mean": es.centroid.tolist(), "sigma": float(es.sigma),
            "C": es.C.tolist(), "pc": es.pc.tolist(), "ps": es.ps.tolist(),
            "generation": self.generation, "rng": rng_to_json(self._rng),
            "best_history": list(self._best_history), "last_range": self._last_range,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CMAES:
        """Rebuild from :meth:`to_state`; continuing is bitwise identical."""
        check_format(state, STATE_FORMAT, STATE_VERSION)
        try:
            self = cls(np.array(state["mean"], dtype=float), float(state["sigma"]), 0,
                       int(state["lambda_"]), **state["params"])
            es = self._es
            es.C = _matrix(state["C"], self.n)
            es.pc = as_vector(state["pc"], "pc", self.n)
            es.ps = as_vector(state["ps"], "ps", self.n)
            es.update_count = int(state["generation"])
            es._decompose()
            self._best_history = [float(v) for v in state["best_history"]]
            self._last_range = float(state["last_range"])
            self._rng = rng_from_json(state["rng"])
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise InputError(f"malformed CMA-ES checkpoint: {exc}") from None
        return self


def _tunables(params: dict[str, Any]) -> dict[str, Any]:
    """Validated strategy parameters as plain JSON types (int mu, str weights, bool active)."""
    unknown = sorted(set(params) - set(TUNABLE))
    if unknown:
        raise ConfigError(f"unknown CMA-ES parameter(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        kind = {"mu": int, "weights": str, "active": bool}.get(key, float)
        if not _has_kind(value, kind):
            raise ConfigError(f"CMA-ES parameter {key} must be {kind.__name__}, got {value!r}")
        out[key] = kind(value)
    return out


def _has_kind(value: Any, kind: type) -> bool:
    """Whether ``value`` is a (numpy or Python) ``kind``: str, bool, int or finite float."""
    if kind is str:
        return isinstance(value, str)
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    return is_real(value) and (kind is float or float(value).is_integer())


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


class Individual(np.ndarray):
    """A row of X carrying a DEAP ``fitness``, as DEAP's strategies expect."""

    fitness: base.Fitness


def as_individual(x: np.ndarray, fitness: base.Fitness | None = None) -> Individual:
    """View ``x`` as an :class:`Individual` (no copy), with ``fitness`` when given."""
    ind = np.asarray(x, dtype=float).view(Individual)
    if fitness is not None:
        ind.fitness = fitness
    return ind


def as_vector(v: Any, name: str, n: int | None = None) -> np.ndarray:
    """A finite float64 vector (of length ``n`` when given) or ConfigError."""
    arr = np.array(v, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or (n is not None and arr.size != n):
        raise ConfigError(f"{name} must be a non-empty vector"
                          + (f" of length {n}" if n else "") + f", got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} must be finite")
    return arr


def _matrix(v: Any, n: int) -> np.ndarray:
    """A finite symmetric [n, n] float64 matrix or ValueError."""
    arr = np.array(v, dtype=float)
    if arr.shape != (n, n) or not np.all(np.isfinite(arr)) or not np.array_equal(arr, arr.T):
        raise ValueError(f"C must be a finite symmetric [{n}, {n}] matrix")
    return arr


def check_format(state: Any, fmt: str, version: int) -> None:
    """Reject a checkpoint of another kind or a newer version with InputError."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise InputError(f"not an {fmt} checkpoint")
    if state.get("version") != version:
        raise InputError(f"unsupported {fmt} checkpoint version {state.get('version')!r} "
                         f"(this embedpin reads version {version})")
