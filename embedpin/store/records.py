"""The JSON records of a run folder as dataclasses (:class:`Record`): a generation's record,
the run's state and its parts, and ``embedpin analyze``'s token table. Reading one checks its
shape; an InputError names the file."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from embedpin.errors import InputError
from embedpin.store.files import read_json

STATE_VERSION = 1
STATUSES = ("running", "finished", "interrupted")


class Record:
    """A JSON object of the run folder as a dataclass: fields in file order; ``OPTIONAL``
    fields are left out of the file when None; ``NESTED`` names the record type of a field
    (``[type]``: a list of them). Reading checks that every required field is there."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    NESTED: ClassVar[dict[str, Any]] = {}

    def to_json(self) -> dict:
        return {f.name: _dump(getattr(self, f.name)) for f in fields(self)
                if not (getattr(self, f.name) is None and f.name in self.OPTIONAL)}

    @classmethod
    def from_json(cls, data, where: str):
        if not isinstance(data, dict):
            raise InputError(f"malformed {where}: expected a JSON object, got {type(data).__name__}")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise InputError(f"malformed {where}: missing {', '.join(repr(m) for m in missing)}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v, kind = data[f.name], cls.NESTED.get(f.name)
            if isinstance(kind, list) and v is not None:
                if not isinstance(v, list):
                    raise InputError(f"malformed {where}: {f.name!r} must be a list")
                v = [kind[0].from_json(x, where) for x in v]
            elif kind is not None and v is not None:
                v = kind.from_json(v, where)
            values[f.name] = v
        return cls(**values)


def _dump(v):
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, list):
        return [_dump(x) for x in v]
    return v


@dataclass
class CandidateRecord(Record):
    """One rendered candidate: its loss and parts, parameters, per-image losses and image
    paths (relative to its generation folder; previews in a large run, with ``full`` the
    full-size PNGs where they are kept), the render's lineage [B, depth] and seeds.
    Validation renders add ``kind`` ("best" / "mean"; ``index`` None for the mean) and
    ``eligible`` (within ``--max-distance``); their image paths are relative to the run."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("kind", "eligible", "full")

    index: int | None
    loss: float
    flip: float | None = None
    clip: float | None = None
    distance: float | None = None
    params: dict[str, list[float]] = field(default_factory=dict)
    image_losses: list[float | None] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    lineage: list[list[int]] | None = None
    seeds: list[list[int]] | None = None
    kind: str | None = None
    eligible: bool | None = None
    full: list[str] | None = None  # full-size PNGs when ``images`` are previews (the generation's best)


@dataclass
class GenerationRecord(Record):
    """``generations/NNNN/generation.json``: the optimizer's step size, the search seed, the
    best candidate's index and error maps, every candidate, and the validation renders."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("validation",)
    NESTED: ClassVar[dict[str, Any]] = {"candidates": [CandidateRecord], "validation": [CandidateRecord]}

    generation: int
    sigma: float | None = None
    best_candidate: int | None = None
    errmaps: list[str] = field(default_factory=list)
    seed: int | None = None
    candidates: list[CandidateRecord] = field(default_factory=list)
    validation: list[CandidateRecord] | None = None

    def candidate(self, index) -> CandidateRecord | None:
        return next((c for c in self.candidates if c.index == index), None)


@dataclass
class HistoryEntry(Record):
    """One committed generation in ``state.json``: loss quantiles, the optimizer's step size,
    axis ratio and covariance spectrum, the best candidate's parts and parameters, the
    validation losses by kind, time and render counts; on Ray workers, ``workers``: the seconds
    each worker spent on the generation's renders (``{"w0": 3.1, ...}``)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("workers",)

    generation: int
    best: float
    median: float | None = None
    worst: float | None = None
    sigma: float | None = None
    axis_ratio: float | None = None
    eigenvalues: list[float] | None = None
    flip: float | None = None
    clip: float | None = None
    best_candidate: int | None = None
    best_params: dict[str, list[float]] = field(default_factory=dict)
    validation: dict[str, float] | None = None
    seconds: float | None = None
    renders: int = 0
    validation_renders: int = 0
    unet_evals: int = 0
    workers: dict[str, float] | None = None


@dataclass
class PinnedRecord(Record):
    """The pinned result in ``state.json``: where it comes from (generation and candidate
    index, "mean", or "plain" for the plain prompt) and its figures; a validated one keeps
    its validation renders (``images`` relative to the run, ``image_losses``); ``x``: its
    standardized search vector."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("kind", "images", "image_losses", "validation", "x")

    generation: int | None
    candidate: int | str | None
    kind: str | None = None
    loss: float | None = None
    flip: float | None = None
    clip: float | None = None
    distance: float | None = None
    params: dict[str, list[float]] = field(default_factory=dict)
    images: list[str] | None = None
    image_losses: list[float | None] | None = None
    validation: bool | None = None
    x: list[float] | None = None  # its standardized search vector (None: the plain prompt)


@dataclass
class FileRecord(Record):
    """The run's textual-inversion file in ``state.json``: the validated candidate that holds
    all of its result in its token vectors (every other block at its default, CFG and
    strength in the recipe) with the lowest validation loss, when it beats the plain prompt.
    ``kind``: "best" / "mean" (which validated candidate of its generation); ``x``: its
    standardized search vector."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("images", "image_losses")

    generation: int
    kind: str
    loss: float
    x: list[float]
    flip: float | None = None
    clip: float | None = None
    params: dict[str, list[float]] = field(default_factory=dict)
    images: list[str] | None = None
    image_losses: list[float | None] | None = None


@dataclass
class PlainValidation(Record):
    """The plain prompt on the validation seeds: the run's reference line."""

    loss: float
    flip: float | None = None
    clip: float | None = None
    image_losses: list[float | None] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    seed: int | None = None
    renders: int = 0


@dataclass
class StartRecord(Record):
    """One possible start of the search: the inversion's vectors after ``step`` steps (0: the
    init words) and their loss on the validation seeds."""

    step: int
    loss: float


@dataclass
class InversionRecord(Record):
    """The gradient stage before the search (``evaluation.inversion``): its steps, seconds and
    denoising loss over its first and last tenth of steps; the search's start, whose vectors are
    in ``INVERSION``: the inversion's step ``start`` (0: the init words), chosen among ``starts``
    on the validation seeds (None: the end, unvalidated). 0 steps and a ``note``: the model gave
    no gradient, the search started at the init words."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("note", "start", "starts")
    NESTED: ClassVar[dict[str, Any]] = {"starts": [StartRecord]}

    steps: int
    seconds: float
    loss_start: float | None = None
    loss_end: float | None = None
    note: str | None = None  # why it did not run (a model that gives no gradient)
    start: int | None = None
    starts: list[StartRecord] | None = None


@dataclass
class TokenRow(Record):
    """One prompt token of ``embedpin analyze`` (``embedpin.analysis``): its label, whether it is
    a placeholder, written and pinned weights, the search's spread along it (weight units; None:
    not searched), the validation-loss change of removing it, zeroing it and doubling it, and
    its verdict (tight / loose / irrelevant)."""

    index: int
    token: str
    placeholder: bool
    written: float
    weight: float
    spread: float | None
    remove: float
    zero: float
    double: float
    verdict: str


@dataclass
class TokenAnalysis(Record):
    """``analysis.json``: the token table of the run's pinned result at ``generation`` committed
    generations, measured against its validation loss ``loss`` on ``seeds`` validation seeds
    (``plain``: the plain prompt's), with the verdict thresholds (fractions of ``loss``)."""

    NESTED: ClassVar[dict[str, Any]] = {"rows": [TokenRow]}

    generation: int
    loss: float
    plain: float | None
    seeds: int
    tight: float
    irrelevant: float
    rows: list[TokenRow] = field(default_factory=list)


@dataclass
class RunState(Record):
    """``state.json``: status, committed generations, the pinned result, history, the
    Pareto front (``--max-distance``), the optimizer's JSON state, the plain prompt's
    validation, the search space's description, why the run stopped, notes on its setup and the
    prompt's token labels (what each token weight weighs), the gradient stage's record and the
    textual-inversion file's."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("space", "stop_reason", "notes", "tokens", "inversion", "file")
    NESTED: ClassVar[dict[str, Any]] = {"best": PinnedRecord, "history": [HistoryEntry],
                                        "plain_validation": PlainValidation, "inversion": InversionRecord,
                                        "file": FileRecord}

    version: int = STATE_VERSION
    status: str = "running"
    generation: int = 0
    best: PinnedRecord | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    plain_validation: PlainValidation | None = None
    space: dict[str, Any] | None = None
    stop_reason: str | None = None
    notes: list[str] | None = None  # what the run's setup means for its result (shown in the report)
    tokens: list[str] | None = None  # the prompt's token labels, one per token weight (placeholders last)
    inversion: InversionRecord | None = None  # the gradient stage, once done (its vectors: INVERSION)
    file: FileRecord | None = None  # the textual-inversion file: the best validated all-in-vectors candidate

    @classmethod
    def read(cls, path: Path) -> RunState:
        """The state at ``path``, checked (version, status, field shapes), or an InputError."""
        data = read_json(path)
        if data.get("version") != STATE_VERSION:
            raise InputError(f"{path}: unknown run-state version {data.get('version')!r}")
        state = cls.from_json(data, str(path))
        if state.status not in STATUSES:
            raise InputError(f"malformed {path}: unknown status {state.status!r}")
        if not isinstance(state.generation, int) or state.generation < 0:
            raise InputError(f"malformed {path}: 'generation' must be an integer >= 0")
        return state
