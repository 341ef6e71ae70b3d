"""The run store ``runs/<id>/``, in one place: its layout, atomic writes, the writer the
run loop uses and the reader the reports, ``export``, ``render`` and ``--resume`` open.

Layout::

    runs/NNNN-<slug>/
      config.toml            the RunConfig (everything needed to reproduce the run)
      inputs.json            the SHA-256 of every input file (targets, masks, guide and init images, an
                             init embedding): --resume refuses a run whose inputs changed
      state.json             status, committed generation count, pinned result, history, optimizer
      pinned.safetensors     the pinned conditioning + its recipe (metadata)
      inversion.safetensors  the token vectors textual inversion fitted before the search (its start)
      targets/target_TT.png  targets/mask_TT.png (its --mask, at the render size)  targets/guide_GG.png
      validation/plain_iBB.png
      generations/NNNN/      generation.json, images/cII_iBB.png, validation/, errmaps/

Every write is atomic (a temporary file in the same folder, then ``os.replace``): a reader
(a browser refreshing the page, a second ``embedpin report``) sees the old file or the new
one, never half of one. A generation folder is assembled under a temporary name and
renamed into place before ``state.json`` names it, so a run killed at any moment resumes
from its last complete generation. State is JSON, tensors are safetensors: nothing here
unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError, StoreError

if TYPE_CHECKING:
    import torch

STATE_VERSION = 1
STATUSES = ("running", "finished", "interrupted")
STATE, CONFIG, PINNED, GENERATION = "state.json", "config.toml", "pinned.safetensors", "generation.json"
INPUTS = "inputs.json"
ANALYSIS = "analysis.json"  # embedpin analyze's token table (embedpin.analysis), read by the report
INVERSION = "inversion.safetensors"  # the token vectors the gradient stage fitted (the search's start)


def generation_dirname(generation: int) -> str:
    """``3 -> "0003"``: the folder name of a generation inside ``generations/``."""
    return f"{generation:04d}"


def target_file(i: int, kind: str = "target") -> str:
    """``targets/target_TT.png`` (``kind`` "mask": target TT's mask ``targets/mask_TT.png``; "guide":
    ``targets/guide_GG.png``), relative to the run."""
    return f"targets/{kind}_{i:02d}.png"


def candidate_image(i: int, b: int) -> str:
    """Image b of candidate i, relative to its generation folder."""
    return f"images/c{i:02d}_i{b:02d}.png"


def validation_image(kind: str, b: int) -> str:
    """Validation render b of ``kind`` (best / mean / plain), relative to its folder."""
    return f"validation/{kind}_i{b:02d}.png"


def errmap_image(b: int) -> str:
    """The best candidate's ꟻLIP error map of image b, relative to its generation folder."""
    return f"errmaps/i{b:02d}.png"


# -- atomic writes ---------------------------------------------------------------------
def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_vectors(path: Path, vectors: np.ndarray) -> Path:
    """Token vectors [N, Din] as a safetensors file (``vectors``), atomically."""
    from safetensors.numpy import save

    return write_bytes(path, save({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}))


def read_vectors(path: Path) -> np.ndarray:
    """Token vectors [N, Din] written by :func:`write_vectors` (an InputError if unreadable)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))["vectors"]
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: the run's inversion vectors cannot be read ({e}); remove 'inversion' from "
                         "state.json to fit them again") from None


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj, allow_nan: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically (``allow_nan``: Infinity/NaN allowed)."""
    return write_text(path, json.dumps(obj, indent=1, allow_nan=allow_nan))


def save_image(path: Path, image, **params) -> Path:
    """Save a PIL image atomically; the format follows the suffix (``.png``, ``.jpg``, ``.gif``)."""
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(Path(path).suffix.lower(), Path(path).suffix[1:].upper())
    image.save(buf, format=fmt, **params)
    return write_bytes(path, buf.getvalue())


def save_figure(path: Path, figure, **params) -> Path:
    """Save a matplotlib figure atomically; the format follows the suffix."""
    buf = io.BytesIO()
    figure.savefig(buf, format=Path(path).suffix[1:], **params)
    return write_bytes(path, buf.getvalue())

def to_uint8(images) -> np.ndarray:
    """Images [..., 3, H, W] (torch or numpy, float in [0, 1]) as uint8 [..., H, W, 3], rounded as
    their PNGs store them (a single-channel [H, W] stays [H, W])."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.moveaxis(arr, -3, -1) if arr.ndim >= 3 and arr.shape[-3] in (1, 3) else arr


def _pil(image) -> Image.Image:
    """An image [3, H, W] (torch or numpy, float in [0, 1]), or uint8 [H, W, 3] as :func:`to_uint8`
    gives, as PIL (the same picture either way)."""
    arr = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 else to_uint8(image)
    return Image.fromarray(arr.squeeze())


def save_png(path: str | Path, image) -> Path:
    """Write an image as PNG, atomically (:func:`_pil`'s inputs)."""
    return save_image(path, _pil(image))


# A render's preview: what the report shows of every image of a large run (``--keep-images
# best``), a lossy WebP whose longest side is PREVIEW_SIDE (measured on 512² photographs: about
# 5 KB, against 380 KB for the PNG). Renders of FULL_AREA pixels and more keep previews.
PREVIEW_SIDE, PREVIEW_QUALITY, PREVIEW = 192, 75, ".webp"
FULL_AREA = 256 * 256


def save_preview(path: str | Path, image) -> Path:
    """Write an image's preview (:data:`PREVIEW_SIDE`, WebP), atomically."""
    im = _pil(image).convert("RGB")
    im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return save_image(path, im, quality=PREVIEW_QUALITY, method=6)


def keeps_previews(config: RunConfig) -> bool:
    """Whether the run keeps previews (and full PNGs of each generation's best only): at
    :data:`FULL_AREA` and up, unless ``--keep-images all``."""
    r = config.render
    return config.keep_images != "all" and (r.height or 0) * (r.width or 0) >= FULL_AREA


def save_render(folder: Path, rel: str, image, previews: bool, full: bool = False) -> tuple[str, str | None]:
    """Write one render under ``folder``: ``rel`` (a ``.png`` path) as a PNG, or, with
    ``previews``, as a preview beside it and the PNG only when ``full``. Returns (the file the
    report shows, the full-size PNG or None), relative to ``folder``."""
    if not previews:
        save_png(folder / rel, image)
        return rel, None
    shown = Path(rel).with_suffix(PREVIEW).as_posix()
    save_preview(folder / shown, image)
    if full:
        save_png(folder / rel, image)
    return shown, rel if full else None


# -- typed records -----------------------------------------------------------------------
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
class InversionRecord(Record):
    """The gradient stage before the search (``optimizer.inversion``): its steps, seconds and
    denoising loss over its first and last tenth of steps; the vectors are in ``INVERSION``
    (0 steps and a ``note``: the model gave no gradient, the search started at the init words)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("note",)

    steps: int
    seconds: float
    loss_start: float | None = None
    loss_end: float | None = None
    note: str | None = None  # why it did not run (a model that gives no gradient)


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


def read_analysis(root: Path) -> TokenAnalysis | None:
    """The run's stored token analysis (None: never measured)."""
    path = Path(root) / ANALYSIS
    return TokenAnalysis.from_json(read_json(path), str(path)) if path.is_file() else None


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


# -- the writer ------------------------------------------------------------------------
def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:40].rstrip("-") or "run"


class RunStore:
    """One run folder. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- paths -----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE

    def generation_dir(self, g: int) -> Path:
        return self.root / "generations" / generation_dirname(g)

    # -- creation / opening ----------------------------------------------------------
    @classmethod
    def create(cls, config: RunConfig, files: dict[str, torch.Tensor] | None = None,
               inputs: dict[str, str] | None = None) -> RunStore:
        """Make ``<out>/NNNN-<slug>/`` with config.toml and an initial state, all or nothing.

        ``files`` maps relative paths to images [3, H, W] (targets, guide) written with it;
        ``inputs`` the input files' digests (:func:`file_digest`), kept in inputs.json. A folder
        that cannot be written is a StoreError.
        """
        try:
            return cls._create(config, files or {}, inputs or {})
        except OSError as e:
            raise StoreError(f"cannot create a run folder in {config.out}: {e.strerror or e}") from None

    @classmethod
    def _create(cls, config: RunConfig, files: dict[str, torch.Tensor], inputs: dict[str, str]) -> RunStore:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".new-"))
        try:
            (tmp / "generations").mkdir()
            write_text(tmp / CONFIG, config.to_toml())
            write_json(tmp / INPUTS, {"sha256": inputs})
            for rel, img in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                save_png(tmp / rel, img)
            write_json(tmp / STATE, RunState().to_json())
            slug = _slug(config.prompt.prompt or "image guided")
            while True:
                used = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d{4,})-", p.name))]
                final = out / f"{max(used, default=0) + 1:04d}-{slug}"
                try:
                    os.rename(tmp, final)
                    break
                except OSError:
                    if not final.exists():
                        raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(final)

    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        """An existing run folder, cleaned of what a stopped run left half-written (:meth:`clean`)."""
        root = Path(path)
        if not (root / STATE).is_file() or not (root / CONFIG).is_file():
            raise InputError(f"{path}: not an embedpin run folder (no state.json / config.toml)")
        store = cls(root)
        try:
            store.clean()
        except OSError as e:
            raise StoreError(f"cannot write the run folder {root}: {e.strerror or e}") from None
        return store

    def clean(self) -> None:
        """Drop leftovers of an interrupted write: temp files anywhere in the folder and
        generations state.json does not name (assembled, or renamed into place, but uncommitted)."""
        done = self.read_state().generation
        gens = self.root / "generations"
        for p in list(gens.iterdir()) if gens.is_dir() else []:
            if p.name.startswith(".") or (p.name.isdigit() and int(p.name) >= done):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.root.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)

    def check_inputs(self, digests: dict[str, str | None]) -> None:
        """An InputError naming the first input file that is not the one the run started with
        (``digests``: the files the run's config names now, None for one that is gone); runs from
        before inputs.json are not checked."""
        path = self.root / INPUTS
        if not path.is_file():
            return
        started = read_json(path).get("sha256", {})
        for name in [*started, *(n for n in digests if n not in started)]:
            if digests.get(name) != started.get(name):
                what = "is gone" if digests.get(name) is None else \
                    "is new" if name not in started else "has changed"
                raise InputError(f"the run's input {name} {what} since the run started ({INPUTS} in the run folder "
                                 f"has the files it started with): put the original back to resume, or start a new run")

    def config(self) -> RunConfig:
        return RunConfig.from_toml(self.root / CONFIG)

    def read_state(self) -> RunState:
        return RunState.read(self.state_path)

    def write_state(self, state: RunState) -> None:
        write_json(self.state_path, state.to_json(), allow_nan=True)  # optimizer state may hold Infinity

    # -- generations -----------------------------------------------------------------
    def begin_generation(self, g: int) -> Path:
        """A fresh temporary folder to assemble generation ``g`` in."""
        tmp = self.root / "generations" / f".{g:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        return tmp

    def finish_generation(self, g: int, tmp: Path, record: GenerationRecord) -> Path:
        """Write generation.json, then move the folder into place (atomic rename)."""
        write_json(tmp / GENERATION, record.to_json())
        final = self.generation_dir(g)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final


def file_digest(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes (hex), None when there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


# -- the reader ------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or an InputError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"missing run file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable run file {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"malformed run file {path}: expected a JSON object")
    return data


def read_config(path: Path) -> RunConfig | None:
    """The run's :class:`RunConfig` from ``config.toml`` (None when the file is absent)."""
    if not Path(path).exists():
        return None
    try:
        return RunConfig.from_toml(path)
    except (OSError, ConfigError) as e:
        raise InputError(f"unreadable run config {path}: {e}") from None


@dataclass(frozen=True)
class Run:
    """One run folder: its recipe, its state and lazily its generations' records."""

    root: Path
    config: RunConfig | None
    state: RunState

    @property
    def status(self) -> str:
        return self.state.status

    @property
    def live(self) -> bool:
        """True while the run loop is still going (pages refresh themselves)."""
        return self.status == "running"

    @property
    def count(self) -> int:
        """Number of completed generations (0 .. count-1 are on disk)."""
        return self.state.generation

    @property
    def history(self) -> list[HistoryEntry]:
        return self.state.history

    @property
    def best(self) -> PinnedRecord | None:
        return self.state.best

    @property
    def pareto(self) -> list[dict]:
        return self.state.pareto

    @property
    def id(self) -> str:
        return self.root.name

    def generation_dir(self, generation: int) -> Path:
        return self.root / "generations" / generation_dirname(generation)

    def generation(self, generation: int) -> GenerationRecord:
        """The record ``generations/NNNN/generation.json``, checked."""
        path = self.generation_dir(generation) / GENERATION
        return GenerationRecord.from_json(read_json(path), f"record of generation {generation} ({path})")

    @cached_property
    def generations(self) -> list[int]:
        """Generations with a record on disk, in order."""
        return sorted(int(p.parent.name) for p in self.root.glob(f"generations/[0-9]*/{GENERATION}")
                      if p.parent.name.isdigit())


def load_run(run_dir: str | Path) -> Run:
    """Open ``run_dir`` for reporting, or raise InputError if it is not a run folder."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"no run folder at {root}")
    if not (root / STATE).exists():
        raise InputError(f"{root} is not a run folder (no state.json)")
    return Run(root=root, config=read_config(root / CONFIG), state=RunState.read(root / STATE))
