"""embedpin's DEAP-based CMA-ES vs pycma (and stock DEAP) on classic test functions.

All three run side by side, same x0 / sigma0 / population per seed, driven by the
same ask/tell loop. Target cases (sphere, ellipsoid, Rosenbrock) report the median
number of evaluations to reach f < 1e-8 (a run that does not reach it within the cap
counts as the cap); Rastrigin reports the median best value after a fixed budget.
Headline figures are ratios of medians, ours / pycma (lower is better, goal <= 1.2),
printed last; ``stock_deap`` rows show the unmodified ``deap.cma.Strategy`` for contrast.
Budgets per run (caps): 10-D 5k (sphere, Rastrigin) / 20k evaluations, 40-D 20k (sphere,
Rastrigin), 60k (ellipsoid), 80k (Rosenbrock); a capped run counts as its cap. The full
run takes about 3 CPU-minutes.

    PYTHONPATH=. python benchmarks/cmaes_vs_pycma.py [--seeds 5] [--rastrigin-seeds 11]
        [--only sphere_10d,...]

BLAS threads are pinned to 1 (small matrices: threading only adds overhead to both).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import cma  # noqa: E402
import numpy as np  # noqa: E402
from deap import cma as deap_cma  # noqa: E402

from embedpin.optimizer.cmaes import (  # noqa: E402
    CMAES,
    FitnessMin,
    as_individual,
    default_population,
)
from embedpin.optimizer.rng import deap_rng, make_rng  # noqa: E402

TARGET = 1e-8


def sphere(X: np.ndarray) -> np.ndarray:
    """sum x_i^2, [λ, n] -> [λ]."""
    return np.sum(X**2, axis=1)


def ellipsoid(X: np.ndarray) -> np.ndarray:
    """sum 10^(6 i/(n-1)) x_i^2 (condition 1e6)."""
    n = X.shape[1]
    return (X**2) @ (10.0 ** (6 * np.arange(n) / (n - 1)))


def rosenbrock(X: np.ndarray) -> np.ndarray:
    """sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2."""
    return np.sum(100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2, axis=1)


def rastrigin(X: np.ndarray) -> np.ndarray:
    """10 n + sum x_i^2 - 10 cos(2 pi x_i)."""
    return 10 * X.shape[1] + np.sum(X**2 - 10 * np.cos(2 * np.pi * X), axis=1)


class _Pycma:
    def __init__(self, x0: np.ndarray, sigma0: float, seed: int) -> None:
        self.es = cma.CMAEvolutionStrategy(x0, sigma0, {"seed": 1000 + seed, "verbose": -9})

    def ask(self) -> np.ndarray:
        return np.array(self.es.ask())

    def tell(self, X: np.ndarray, f: np.ndarray) -> None:
        self.es.tell(list(X), f.tolist())


class _StockDeap:
    """deap.cma.Strategy as shipped (2001 learning rates, no active update)."""

    def __init__(self, x0: np.ndarray, sigma0: float, seed: int) -> None:
        self.es, self.rng = deap_cma.Strategy(x0, sigma0), make_rng(seed)

    def ask(self) -> np.ndarray:
        with deap_rng(self.rng):
            return np.stack(self.es.generate(np.array))

    def tell(self, X: np.ndarray, f: np.ndarray) -> None:
        self.es.update([as_individual(x, FitnessMin((v,))) for x, v in zip(X, f)])


OPTIMIZERS: dict[str, Callable] = {
    "ours": lambda x0, s0, seed: CMAES(x0, s0, seed=seed),
    "pycma": _Pycma,
    "deap": _StockDeap,
}


def run(make: Callable, f: Callable, x0: np.ndarray, seed: int, budget: int,
        to_target: bool) -> tuple[int, float]:
    """Evaluations used (until f < TARGET or the budget) and the best value."""
    opt, evals, best = make(x0, 1.0, seed), 0, math.inf
    while evals < budget:
        X = opt.ask()
        fx = f(X)
        opt.tell(X, fx)
        evals, best = evals + len(fx), min(best, float(fx.min()))
        if to_target and best < TARGET:
            break
    return evals, best


CASES = [  # (function, dims, budget per run, True: evals to f < TARGET)
    (sphere, 10, 5_000, True), (sphere, 40, 20_000, True),
    (ellipsoid, 10, 20_000, True), (ellipsoid, 40, 60_000, True),
    (rosenbrock, 10, 20_000, True), (rosenbrock, 40, 80_000, True),
    (rastrigin, 10, 5_000, False), (rastrigin, 40, 20_000, False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds per evals-to-target case")
    ap.add_argument("--rastrigin-seeds", type=int, default=11,
                    help="seeds per Rastrigin case (its final values are noisy)")
    ap.add_argument("--only", default="", help="comma-separated cases, e.g. sphere_10d")
    args = ap.parse_args()
    only = {c for c in args.only.split(",") if c}
    headline: dict[str, float] = {}
    for f, n, budget, to_target in CASES:
        name = f"{f.__name__}_{n}d"
        if only and name not in only:
            continue
        seeds = args.seeds if to_target else args.rastrigin_seeds
        med, t0 = {}, time.process_time()
        for key, make in OPTIMIZERS.items():
            res = [run(make, f, np.random.default_rng(s).uniform(-2, 2, n), s, budget, to_target)
                   for s in range(seeds)]
            column = [r[0] if to_target else r[1] for r in res]
            capped = sum(r[0] >= budget and r[1] >= TARGET for r in res) if to_target else 0
            med[key] = float(np.median(column))
            print(f"{name:15s} {key:6s} median {'evals' if to_target else 'f':5s} "
                  f"{med[key]:12.4g}  (capped at {budget}: {capped}/{seeds})", flush=True)
        unit = "evals" if to_target else "final_f"
        headline[f"{name}_{unit}_ratio"] = med["ours"] / med["pycma"]
        headline[f"{name}_stock_deap_{unit}_ratio"] = med["deap"] / med["pycma"]
        print(f"{name:15s} lambda={default_population(n)}  "
              f"{time.process_time() - t0:.1f}s CPU", flush=True)
    ours = [v for k, v in headline.items() if "stock" not in k]
    stock = [v for k, v in headline.items() if "stock" in k]
    headline["stock_deap_median_ratio"] = float(np.median(stock))
    headline["median_ratio"] = float(np.median(ours))
    for k, v in headline.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
