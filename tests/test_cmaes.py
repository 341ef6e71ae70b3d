"""CMA-ES and MO-CMA-ES ask/tell: convergence, NaN handling, RNG isolation, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpin.errors import ConfigError, InputError
from embedpin.optimizer.cmaes import CMAES, default_generations, default_population
from embedpin.optimizer.mo import MOCMAES, pareto_front


def sphere(X: np.ndarray) -> np.ndarray:
    return np.sum(X**2, axis=1)


def ellipsoid(X: np.ndarray) -> np.ndarray:
    n = X.shape[1]
    return (X**2) @ (10.0 ** (6 * np.arange(n) / (n - 1)))


def _json_roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_defaults_follow_seed_table() -> None:
    assert [default_population(n) for n in (2, 10, 40, 1000)] == [6, 10, 15, 24]
    assert [default_generations(n) for n in (2, 10, 40, 1000)] == [16, 32, 48, 96]
    es = CMAES(np.zeros(10), 0.5, seed=0)
    assert (es.lambda_, es.mu, es.n, es.generation) == (10, 5, 10, 0)
    assert es.ask().shape == (10, 10)


def test_sphere_10d_reaches_1e8_within_2000_evaluations() -> None:
    es = CMAES(np.full(10, 1.0), 1.0, seed=3)
    evals, best = 0, np.inf
    while best >= 1e-8 and evals < 2000:
        X = es.ask()
        f = sphere(X)
        es.tell(X, f)
        evals, best = evals + len(f), min(best, f.min())
    assert best < 1e-8
    assert es.should_stop(tol_x=1e-3) == "tol_x"
    assert es.should_stop() is None


def test_ellipsoid_learns_the_axis_ratio() -> None:
    es = CMAES(np.full(4, 1.0), 1.0, seed=1)
    for _ in range(120):
        X = es.ask()
        es.tell(X, ellipsoid(X))
    # the true ratio of principal axes of the level sets is sqrt(1e6) = 1000
    assert 300 < es.axis_ratio < 3000
    assert es.eigenvalues.shape == (4,) and np.all(np.diff(es.eigenvalues) >= 0)


def test_nan_and_inf_losses_count_as_worst() -> None:
    broken, worst = CMAES(np.zeros(4), 1.0, seed=5), CMAES(np.zeros(4), 1.0, seed=5)
    X = broken.ask()
    assert np.array_equal(X, worst.ask())
    losses = sphere(X - 3.0)
    bad = np.sort(np.argsort(losses)[:3])  # the three best candidates break...
    nan_losses, worst_losses = losses.copy(), losses.copy()
    nan_losses[bad] = [np.nan, np.inf, -np.inf]
    worst_losses[bad] = [1e9, 1e9 + 1, 1e9 + 2]  # ...and rank exactly like the worst three
    broken.tell(X, nan_losses)
    worst.tell(X, worst_losses)
    assert np.array_equal(broken.mean, worst.mean) and broken.sigma == worst.sigma
    assert np.array_equal(broken.eigenvalues, worst.eigenvalues)
    assert np.all(np.isfinite(broken.mean)) and np.isfinite(broken.sigma)


def test_tell_leaves_callers_arrays_untouched() -> None:
    es = CMAES(np.zeros(5), 1.0, seed=2)
    X = es.ask()
    losses = sphere(X)
    X_before, losses_before = X.copy(), losses.copy()
    es.tell(X, losses)
    assert np.array_equal(X, X_before) and np.array_equal(losses, losses_before)


def test_global_numpy_rng_is_neither_used_nor_disturbed() -> None:
    np.random.seed(1234)
    expected = np.random.random_sample(3)
    np.random.seed(1234)
    a, b = CMAES(np.zeros(8), 0.3, seed=9), CMAES(np.zeros(8), 0.3, seed=9)
    np.random.seed(999)  # b must not care what the global state is
    for _ in range(3):
        Xa, Xb = a.ask(), b.ask()
        assert np.array_equal(Xa, Xb)
        a.tell(Xa, sphere(Xa))
        b.tell(Xb, sphere(Xb))
    np.random.seed(1234)
    c = CMAES(np.zeros(8), 0.3, seed=9)
    c.tell(c.ask(), np.arange(c.lambda_, dtype=float))
    assert np.array_equal(np.random.random_sample(3), expected)
    assert not np.array_equal(CMAES(np.zeros(8), 0.3, seed=10).ask(),
                              CMAES(np.zeros(8), 0.3, seed=9).ask())


@pytest.mark.parametrize("params", [{}, {"active": False, "weights": "linear"}])
def test_resume_from_json_state_is_bitwise_identical(params: dict) -> None:
    def step(es: CMAES) -> np.ndarray:
        X = es.ask()
        es.tell(X, ellipsoid(X + 0.5))
        return X

    straight = CMAES(np.full(7, 0.8), 0.7, seed=11, lambda_=9, **params)
    for _ in range(5):
        step(straight)
    resumed = CMAES.from_state(_json_roundtrip(straight.to_state()))
    for _ in range(12):
        assert np.array_equal(step(straight), step(resumed))
    assert resumed.to_state() == straight.to_state()
    assert resumed.sigma == straight.sigma and resumed.generation == 17


def test_state_holds_only_dynamic_attributes() -> None:
    state = CMAES(np.zeros(3), 1.0, seed=0).to_state()
    assert {"mean", "sigma", "C", "pc", "ps", "generation", "rng"} <= set(state)
    assert not {"B", "diagD", "BD", "weights"} & set(state)


def test_bad_input_raises_our_errors() -> None:
    with pytest.raises(ConfigError):
        CMAES(np.zeros(3), -1.0, seed=0)
    with pytest.raises(ConfigError):
        CMAES(np.array([0.0, np.nan]), 1.0, seed=0)
    with pytest.raises(ConfigError):
        CMAES(np.zeros(3), 1.0, seed=-1)
    with pytest.raises(ConfigError):
        CMAES(np.zeros(3), 1.0, seed=0, ccov=0.1)
    state = CMAES(np.zeros(3), 1.0, seed=0).to_state()
    with pytest.raises(InputError):
        CMAES.from_state({**state, "version": 99})
    with pytest.raises(InputError):
        CMAES.from_state({**state, "C": [[1.0]]})
    es = CMAES(np.zeros(3), 1.0, seed=0)
    with pytest.raises(ValueError):
        es.tell(es.ask()[:2], np.zeros(2))


def test_pareto_front_fixed_points() -> None:
    points = np.array([[1.0, 5.0], [2.0, 2.0], [3.0, 3.0], [5.0, 1.0],
                       [2.0, 2.0], [0.5, np.nan], [6.0, 0.5]])
    assert pareto_front(points).tolist() == [0, 1, 3, 4, 6]
    assert pareto_front(np.zeros((0, 2))).tolist() == []


def _mo_problem(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loss is lowest at x = 1 (all ones); distance from the plain prompt x = 0."""
    return np.sum((X - 1.0) ** 2, axis=1), np.linalg.norm(X, axis=1)


def test_mo_front_trades_loss_for_distance_and_respects_the_limit() -> None:
    mo = MOCMAES(np.zeros(3), 0.3, seed=4, max_distance=0.8)
    X0 = mo.ask()
    assert X0.shape == (mo.mu, 3) and np.array_equal(X0[0], np.zeros(3))
    for _ in range(60):
        X = mo.ask()
        mo.tell(X, *_mo_problem(X))
    X, F = mo.front()
    assert len(F) >= 4 and np.all(np.diff(F[:, 1]) >= 0) and np.all(np.diff(F[:, 0]) <= 0)
    # on this problem the exact front is the segment t * ones: loss = 3 (1 - |x|/sqrt 3)^2
    np.testing.assert_allclose(F[:, 0], 3 * (1 - F[:, 1] / np.sqrt(3)) ** 2, rtol=0.2, atol=0.02)
    x, loss, dist = mo.best
    assert dist <= 0.8 and loss < 3 * (1 - 0.8 / np.sqrt(3)) ** 2 + 0.05


def test_mo_nan_candidates_do_not_break_the_run() -> None:
    mo = MOCMAES(np.zeros(2), 0.3, seed=0, max_distance=1.0)
    for _ in range(6):
        X = mo.ask()
        loss, dist = _mo_problem(X)
        loss[0] = np.nan
        mo.tell(X, loss, dist)
    assert mo.generation == 5 and np.all(np.isfinite(mo.sigmas))
    assert np.isfinite(mo.best[1])


def test_mo_resume_from_json_state_is_bitwise_identical() -> None:
    def step(mo: MOCMAES) -> np.ndarray:
        X = mo.ask()
        mo.tell(X, *_mo_problem(X))
        return X

    straight = MOCMAES(np.zeros(4), 0.4, seed=8, max_distance=1.0, lambda_=3)
    for _ in range(4):
        step(straight)
    resumed = MOCMAES.from_state(_json_roundtrip(straight.to_state()))
    for _ in range(8):
        assert np.array_equal(step(straight), step(resumed))
    assert resumed.to_state() == straight.to_state()


def test_mo_global_rng_untouched_and_tell_checks_x() -> None:
    state = np.random.get_state()
    mo = MOCMAES(np.zeros(3), 0.2, seed=1, max_distance=1.0, lambda_=2)
    for _ in range(3):
        X = mo.ask()
        mo.tell(X, *_mo_problem(X))
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]
    X = mo.ask()
    with pytest.raises(ValueError):
        mo.tell(X + 1e-9, *_mo_problem(X))
