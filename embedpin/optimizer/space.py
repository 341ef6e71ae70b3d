"""The search space: named, bounded parameter blocks over one standardized vector.

CMA-ES searches x ∈ ℝⁿ where x = 0 is the plain prompt (every block at its default) and
one unit of x is one ``Block.scale`` of change near the default, so a single sigma fits
all blocks. Each coordinate maps to its value v(x) by a smooth bijection with
v(0) = default exactly and v'(0) = scale:

- unbounded:      v = d + s·x
- both bounds:    v = d + (u - l)·(σ(a·x + b) - σ(b)), a logistic (tanh-style) curve with
                  b = ln((d - l)/(u - d)) and a = s·(u - l)/((d - l)(u - d)); saturates
                  smoothly towards l and u when s is large against the range
- lower only:     v = d + c·(softplus(k·x + β) - softplus(β)), c = d - l, β = ln(e - 1),
                  k = s/(c·σ(β)); exponential approach to l, linear growth upwards
- upper only:     the mirror image of "lower only"

The default must lie strictly inside the bounds. Values never leave [l, u] for any
finite x (float rounding near a bound is guarded by a min/max of one ulp, not by
clipping that the strategy could feel).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from embedpin.errors import ConfigError, InputError

SPACE_FORMAT = "embedpin.space"  # the format id in state.json (not a module path: it never changes)
SPACE_VERSION = 1


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    """Logistic function without overflow: exp(-softplus(-z))."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=float)))


def _softplus(z: np.ndarray | float) -> np.ndarray:
    """ln(1 + e^z) without overflow."""
    return np.logaddexp(0.0, np.asarray(z, dtype=float))


def _softplus_inv(y: np.ndarray | float) -> np.ndarray:
    """Inverse of softplus for y > 0: y + ln(1 - e^-y)."""
    y = np.asarray(y, dtype=float)
    return y + np.log(-np.expm1(-y))


_BETA = float(_softplus_inv(1.0))  # softplus(β) = 1: the one-sided curve's anchor


@dataclass(frozen=True)
class Block:
    """A named slice of the search vector.

    ``default`` is the parameter value at x = 0 (the plain prompt); ``scale`` is the
    change in value per unit of x near the default; ``lower``/``upper`` (None =
    unbounded) are enforced by a smooth transform the strategy sees, never clipping.
    """

    name: str
    size: int
    lower: float | None
    upper: float | None
    default: float
    scale: float

    @property
    def transform(self) -> str:
        """Which curve maps x to values: affine, logistic, softplus-lower, softplus-upper."""
        if self.lower is None and self.upper is None:
            return "affine"
        if self.lower is not None and self.upper is not None:
            return "logistic"
        return "softplus-lower" if self.lower is not None else "softplus-upper"

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless size, scale, bounds and default make sense."""
        where = f"search block {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"search block names must be non-empty strings, got {self.name!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) \
                or self.size < 1:
            raise ConfigError(f"{where}: size must be a positive integer, got {self.size!r}")
        numbers = {"default": self.default, "scale": self.scale,
                   "lower": self.lower, "upper": self.upper}
        for key, value in numbers.items():
            if value is not None and not (_is_number(value) and math.isfinite(value)):
                raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        if not self.scale > 0:
            raise ConfigError(f"{where}: scale must be positive, got {self.scale!r}")
        lo = -math.inf if self.lower is None else self.lower
        hi = math.inf if self.upper is None else self.upper
        if not lo < self.default < hi:
            raise ConfigError(f"{where}: default {self.default} must lie strictly inside "
                              f"the bounds ({self.lower}, {self.upper})")
        slope, offset = self._constants()
        span = (hi if hi < math.inf else self.default) - (lo if lo > -math.inf else self.default)
        if not (0 < slope < math.inf and math.isfinite(offset) and math.isfinite(span)):
            raise ConfigError(f"{where}: default {self.default} is too close to a bound "
                              f"or the range is too wide for float64")

    def _constants(self) -> tuple[float, float]:
        """(slope, offset) of the inner affine map: (a, b) or (k, β); (s, 0) if affine."""
        d, s = np.float64(self.default), np.float64(self.scale)
        lo, hi = self.lower, self.upper
        with np.errstate(all="ignore"):
            if lo is not None and hi is not None:
                b = np.log(d - lo) - np.log(hi - d)
                return float(s * (hi - lo) / ((d - lo) * (hi - d))), float(b)
            if lo is not None or hi is not None:
                c = d - lo if lo is not None else hi - d
                return float(s / (c * _sigmoid(_BETA))), _BETA
        return float(s), 0.0

    def to_value(self, x: np.ndarray) -> np.ndarray:
        """Values for standardized coordinates ``x`` (any shape), elementwise."""
        x = np.asarray(x, dtype=float)
        d, lo, hi = float(self.default), self.lower, self.upper
        slope, off = self._constants()
        with np.errstate(over="ignore", invalid="ignore"):
            if self.transform == "affine":
                return d + self.scale * x
            if self.transform == "logistic":
                v = d + (hi - lo) * (_sigmoid(slope * x + off) - _sigmoid(off))
                return np.minimum(np.maximum(v, lo), hi)
            if self.transform == "softplus-lower":
                v = d + (d - lo) * (_softplus(slope * x + off) - _softplus(off))
                return np.maximum(v, lo)
            v = d - (hi - d) * (_softplus(-slope * x + off) - _softplus(off))
            return np.minimum(v, hi)

    def to_x(self, v: np.ndarray) -> np.ndarray:
        """Standardized coordinates for values ``v`` strictly inside the bounds (inverse)."""
        v = np.asarray(v, dtype=float)
        d, lo, hi = float(self.default), self.lower, self.upper
        inside = np.isfinite(v) & (v > (-np.inf if lo is None else lo)) \
            & (v < (np.inf if hi is None else hi))
        if not np.all(inside):
            raise ConfigError(f"search block {self.name!r}: values must be finite and "
                              f"strictly inside ({lo}, {hi})")
        slope, off = self._constants()
        if self.transform == "affine":
            return (v - d) / self.scale
        if self.transform == "logistic":
            return (np.log(v - lo) - np.log(hi - v) - off) / slope
        if self.transform == "softplus-lower":
            return (_softplus_inv((v - lo) / (d - lo)) - off) / slope
        return -(_softplus_inv((hi - v) / (hi - d)) - off) / slope


def _is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class SearchSpace:
    """An ordered list of :class:`Block` over one standardized vector of length ``n``."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        blocks = tuple(blocks)
        if not blocks:
            raise ConfigError("the search space is empty: switch at least one block on")
        for block in blocks:
            block.validate()
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"search block names must be unique, got {names}")
        self.blocks = blocks
        stops = np.cumsum([b.size for b in blocks]).tolist()
        self.slices = {b.name: slice(stop - b.size, stop) for b, stop in zip(blocks, stops)}

    @property
    def n(self) -> int:
        """Total length of the search vector."""
        return sum(b.size for b in self.blocks)

    @property
    def names(self) -> list[str]:
        """Block names in vector order."""
        return [b.name for b in self.blocks]

    def x0(self) -> np.ndarray:
        """The plain prompt: zeros [n] (every block at its default)."""
        return np.zeros(self.n)

    def decode(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Standardized X [..., n] -> {name: values [..., size]} (float64, in bounds)."""
        X = np.asarray(X, dtype=float)
        if X.ndim == 0 or X.shape[-1] != self.n:
            raise ValueError(f"decode expects X [..., {self.n}], got shape {X.shape}")
        return {b.name: b.to_value(X[..., self.slices[b.name]]) for b in self.blocks}

    def encode(self, params: Mapping[str, Any]) -> np.ndarray:
        """{name: values [..., size]} -> X [..., n]; exact inverse of :meth:`decode`."""
        missing, unknown = set(self.names) - set(params), set(params) - set(self.names)
        if missing or unknown:
            raise ConfigError(f"encode needs exactly the blocks {self.names}; "
                              f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        xs = []
        for b in self.blocks:
            v = np.asarray(params[b.name], dtype=float)
            if v.ndim == 0 or v.shape[-1] != b.size:
                raise ConfigError(f"search block {b.name!r} has size {b.size}, "
                                  f"got values of shape {v.shape}")
            xs.append(b.to_x(v))
        lead = np.broadcast_shapes(*(x.shape[:-1] for x in xs))
        return np.concatenate([np.broadcast_to(x, lead + x.shape[-1:]) for x in xs], axis=-1)

    def describe(self) -> list[dict[str, Any]]:
        """One row per block for reports: name, slice, size, bounds, default, scale, transform."""
        return [{**asdict(b), "start": self.slices[b.name].start,
                 "stop": self.slices[b.name].stop, "transform": b.transform}
                for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        """Versioned JSON-ready description."""
        return {"format": SPACE_FORMAT, "version": SPACE_VERSION,
                "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Inverse of :meth:`to_dict`; malformed data raises InputError/ConfigError."""
        if not isinstance(data, Mapping) or data.get("format") != SPACE_FORMAT:
            raise InputError(f"not an {SPACE_FORMAT} description")
        if data.get("version") != SPACE_VERSION:
            raise InputError(f"unsupported search space version {data.get('version')!r}")
        try:
            blocks = [Block(**row) for row in data["blocks"]]
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed search space: {exc}") from None
        return cls(blocks)

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> SearchSpace:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InputError(f"search space is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"SearchSpace(n={self.n}, blocks={self.names})"
