"""SearchSpace: bounded smooth transforms, encode/decode round trips, JSON."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedpin.errors import ConfigError, InputError
from embedpin.optimizer.space import Block, SearchSpace

finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def blocks(draw: st.DrawFn, name: str = "b") -> Block:
    kind = draw(st.sampled_from(["affine", "logistic", "lower", "upper"]))
    default = draw(st.floats(-100, 100))
    scale = draw(st.floats(1e-3, 1e3))
    gap = st.floats(1e-3, 1e3)
    lower = default - draw(gap) if kind in ("logistic", "lower") else None
    upper = default + draw(gap) if kind in ("logistic", "upper") else None
    return Block(name, draw(st.integers(1, 3)), lower, upper, default, scale)


def _inside(block: Block, t: np.ndarray) -> np.ndarray:
    """Values strictly inside the bounds, from t in (0, 1)."""
    lo = block.default - 1e3 if block.lower is None else block.lower
    hi = block.default + 1e3 if block.upper is None else block.upper
    return lo + (hi - lo) * t


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace([
        Block("cfg", 1, 1.0, 15.0, 7.5, 2.0),
        Block("delta", 3, None, None, 0.0, 0.1),
        Block("floor", 1, 0.0, None, 0.5, 0.25),
        Block("cap", 2, None, 1.0, 0.2, 0.5),
    ])


def test_layout_and_fixed_values(space: SearchSpace) -> None:
    assert space.n == 7 and space.names == ["cfg", "delta", "floor", "cap"]
    assert space.slices["floor"] == slice(4, 5)
    X = np.array([[1.0, 1.0, -2.0, 0.0, 1.0, 1.0, -1.0],
                  [-50.0, 0.0, 0.0, 0.0, -50.0, 50.0, 0.0]])
    out = space.decode(X)
    assert {k: v.shape for k, v in out.items()} == {
        "cfg": (2, 1), "delta": (2, 3), "floor": (2, 1), "cap": (2, 2)}
    np.testing.assert_allclose(out["cfg"][:, 0], [9.486437, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["delta"][0], [0.1, -0.2, 0.0])
    np.testing.assert_allclose(out["floor"][:, 0], [0.783244, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["cap"][0], [0.604594, -0.380845], atol=1e-6)
    assert out["cap"][1, 0] == 1.0 and out["cap"][1, 1] == 0.2


def test_x0_decodes_exactly_to_defaults(space: SearchSpace) -> None:
    out = space.decode(space.x0()[None])
    assert out["cfg"][0, 0] == 7.5 and out["floor"][0, 0] == 0.5
    assert np.all(out["delta"] == 0.0) and np.all(out["cap"] == 0.2)


@given(block=blocks(), data=st.data())
@settings(max_examples=60, deadline=None)
def test_any_finite_x_stays_within_bounds(block: Block, data: st.DataObject) -> None:
    x = data.draw(hnp.arrays(np.float64, (4, block.size), elements=finite))
    v = block.to_value(x)
    assert not np.any(np.isnan(v))
    if block.lower is not None:
        assert np.all(v >= block.lower)
    if block.upper is not None:
        assert np.all(v <= block.upper)
    ranked = v.ravel()[np.argsort(x, axis=None)]
    assert np.all(ranked[1:] >= ranked[:-1])  # monotone: a bijection, no folding


@given(block=blocks(), data=st.data())
@settings(max_examples=60, deadline=None)
def test_decode_of_encode_is_identity(block: Block, data: st.DataObject) -> None:
    t = data.draw(hnp.arrays(np.float64, (3, block.size), elements=st.floats(1e-3, 1 - 1e-3)))
    space = SearchSpace([block])
    params = {block.name: _inside(block, t)}
    back = space.decode(space.encode(params))[block.name]
    span = (block.upper if block.upper is not None else block.default) \
        - (block.lower if block.lower is not None else block.default) + 1.0
    np.testing.assert_allclose(back, params[block.name], rtol=1e-9, atol=1e-11 * span)


@given(block=blocks(), t=st.floats(-1, 1))
@settings(max_examples=60, deadline=None)
def test_encode_of_decode_is_identity_and_slope_at_zero_is_scale(block: Block, t: float) -> None:
    gaps = [abs(b - block.default) for b in (block.lower, block.upper) if b is not None]
    reach = min([3.0] + [g / block.scale for g in gaps])  # x moving v by at most one gap
    x = np.array([t * reach])
    atol = 1e-6 * reach + 1e-12 * (abs(block.default) + sum(gaps) + 1) / block.scale
    np.testing.assert_allclose(block.to_x(block.to_value(x)), x, rtol=0, atol=atol)
    h = 1e-4 * min([1.0] + [g / block.scale for g in gaps])  # well inside the curvature
    slope = (block.to_value(np.array(h)) - block.to_value(np.array(-h))) / (2 * h)
    np.testing.assert_allclose(slope, block.scale, rtol=1e-3)


def test_large_scale_saturates_smoothly() -> None:
    b = Block("s", 1, 0.0, 1.0, 0.5, 100.0)
    v = b.to_value(np.array([-1.0, -0.01, 0.0, 0.01, 1.0]))
    assert np.all(np.diff(v) > 0) and v[0] >= 0.0 and v[-1] <= 1.0
    assert v[-1] > 0.999 and abs(v[3] - 0.5) < 0.5


def test_json_roundtrip(space: SearchSpace) -> None:
    again = SearchSpace.from_json(space.to_json())
    assert again.blocks == space.blocks and again.slices == space.slices
    rows = space.describe()
    assert [r["transform"] for r in rows] == ["logistic", "affine", "softplus-lower",
                                              "softplus-upper"]
    assert rows[1]["start"] == 1 and rows[1]["stop"] == 4


@pytest.mark.parametrize("blocks_", [
    [],
    [Block("a", 1, 0.0, 1.0, 1.0, 0.1)],  # default on a bound
    [Block("a", 1, 0.0, 1.0, 2.0, 0.1)],  # default outside
    [Block("a", 1, None, None, 0.0, 0.0)],  # zero scale
    [Block("a", 0, None, None, 0.0, 1.0)],  # empty block
    [Block("a", 1, None, None, float("nan"), 1.0)],
    [Block("a", 1, None, None, 0.0, 1.0), Block("a", 2, None, None, 0.0, 1.0)],
])
def test_bad_blocks_raise_config_error(blocks_: list[Block]) -> None:
    with pytest.raises(ConfigError):
        SearchSpace(blocks_)


def test_bad_encode_and_json_raise_our_errors(space: SearchSpace) -> None:
    good = space.decode(np.zeros((1, space.n)))
    with pytest.raises(ConfigError):
        space.encode({**good, "cfg": np.array([[15.0]])})  # on the bound: no preimage
    with pytest.raises(ConfigError):
        space.encode({k: v for k, v in good.items() if k != "cap"})
    with pytest.raises(InputError):
        SearchSpace.from_json("{not json")
    with pytest.raises(InputError):
        SearchSpace.from_json('{"format": "embedpin.space", "version": 7, "blocks": []}')
    with pytest.raises(ValueError):
        space.decode(np.zeros((2, space.n + 1)))
