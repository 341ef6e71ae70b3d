"""One run folder, read and written through one object (:class:`RunStore`): the run loop
creates or opens it for writing, the reports, ``export``, ``render`` and ``analyze`` open it
for reading (:func:`load_run`).

A generation folder is assembled under a temporary name and renamed into place before
``state.json`` names it, so a run killed at any moment resumes from its last complete
generation; opening a run for writing drops what such a stop left half-written. Opening one
for reading changes nothing (the run may still be writing it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError, StoreError
from embedpin.store.files import read_json, save_png, write_json, write_text
from embedpin.store.layout import (
    ANALYSIS,
    CONFIG,
    GENERATION,
    GENERATIONS,
    IMAGES,
    INPUTS,
    RUN_NUMBER,
    STATE,
    generation_dirname,
    run_dirname,
)
from embedpin.store.records import GenerationRecord, HistoryEntry, PinnedRecord, RunState, TokenAnalysis

if TYPE_CHECKING:
    import torch


class RunStore:
    """One run folder ``root``: its config, state and generations' records, and their writes.
    Make one with :meth:`create`, open one to write with :meth:`open`, to read with
    :func:`load_run`. The config and the state are read once, when first asked for
    (:meth:`read_state` reads the state again)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._state: RunState | None = None

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
            return cls(_create(config, files or {}, inputs or {}))
        except OSError as e:
            raise StoreError(f"cannot create a run folder in {config.out}: {e.strerror or e}") from None

    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        """An existing run folder to write (``--resume``), cleaned of what a stopped run left
        half-written (:meth:`clean`)."""
        root = Path(path)
        if not (root / STATE).is_file() or not (root / CONFIG).is_file():
            raise InputError(f"{path}: not an embedpin run folder (no {STATE} / {CONFIG})")
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
        gens = self.root / GENERATIONS
        for p in list(gens.iterdir()) if gens.is_dir() else []:
            if p.name.startswith(".") or (p.name.isdigit() and int(p.name) >= done):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.root.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
        self.__dict__.pop("generations", None)

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

    # -- config and state ------------------------------------------------------------
    def config(self) -> RunConfig | None:
        """The run's :class:`RunConfig` from config.toml (None when the file is absent; an
        InputError when it cannot be read or is not a valid config)."""
        return self._config

    @cached_property
    def _config(self) -> RunConfig | None:
        return _read_config(self.root / CONFIG)

    @property
    def state_path(self) -> Path:
        return self.root / STATE

    @property
    def state(self) -> RunState:
        """The state as last read or written."""
        return self._state if self._state is not None else self.read_state()

    def read_state(self) -> RunState:
        """state.json, read again and checked (an InputError when it is malformed)."""
        self._state = RunState.read(self.state_path)
        return self._state

    def write_state(self, state: RunState) -> None:
        write_json(self.state_path, state.to_json(), allow_nan=True)  # optimizer state may hold Infinity
        self._state = state

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

    # -- generations -----------------------------------------------------------------
    def generation_dir(self, generation: int) -> Path:
        return self.root / GENERATIONS / generation_dirname(generation)

    def generation(self, generation: int) -> GenerationRecord:
        """The record ``generations/NNNN/generation.json``, checked."""
        path = self.generation_dir(generation) / GENERATION
        return GenerationRecord.from_json(read_json(path), f"record of generation {generation} ({path})")

    @cached_property
    def generations(self) -> list[int]:
        """Generations with a record on disk, in order."""
        return sorted(int(p.parent.name) for p in self.root.glob(f"{GENERATIONS}/[0-9]*/{GENERATION}")
                      if p.parent.name.isdigit())

    def begin_generation(self, g: int) -> Path:
        """A fresh temporary folder to assemble generation ``g`` in."""
        tmp = self.root / GENERATIONS / f".{generation_dirname(g)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / IMAGES).mkdir(parents=True)
        return tmp

    def finish_generation(self, g: int, tmp: Path, record: GenerationRecord) -> Path:
        """Write generation.json, then move the folder into place (atomic rename)."""
        write_json(tmp / GENERATION, record.to_json())
        final = self.generation_dir(g)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        self.__dict__.pop("generations", None)
        return final


def load_run(run_dir: str | Path) -> RunStore:
    """Open ``run_dir`` for reading (its state and config read and checked), or raise InputError
    if it is not a run folder."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"no run folder at {root}")
    if not (root / STATE).exists():
        raise InputError(f"{root} is not a run folder (no {STATE})")
    run = RunStore(root)
    run.config()
    run.read_state()
    return run


def read_analysis(root: Path) -> TokenAnalysis | None:
    """The run's stored token analysis (None: never measured)."""
    path = Path(root) / ANALYSIS
    return TokenAnalysis.from_json(read_json(path), str(path)) if path.is_file() else None


def _read_config(path: Path) -> RunConfig | None:
    if not path.exists():
        return None
    try:
        return RunConfig.from_toml(path)
    except (OSError, ConfigError) as e:
        raise InputError(f"unreadable run config {path}: {e}") from None


def _create(config: RunConfig, files: dict[str, torch.Tensor], inputs: dict[str, str]) -> Path:
    """The new run folder, assembled under a temporary name and renamed to the next free number."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".new-"))
    try:
        (tmp / GENERATIONS).mkdir()
        write_text(tmp / CONFIG, config.to_toml())
        write_json(tmp / INPUTS, {"sha256": inputs})
        for rel, img in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_png(tmp / rel, img)
        write_json(tmp / STATE, RunState().to_json())
        return _rename_to_next(tmp, out, config.prompt.prompt or "image guided")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_to_next(tmp: Path, out: Path, prompt: str) -> Path:
    """Rename ``tmp`` to the next run number in ``out`` (another process may take one first)."""
    while True:
        used = [int(m.group(1)) for p in out.iterdir() if (m := RUN_NUMBER.match(p.name))]
        final = out / run_dirname(max(used, default=0) + 1, prompt)
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if not final.exists():
                raise
