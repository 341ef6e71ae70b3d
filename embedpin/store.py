"""The run store ``runs/<id>/``, in one place: its layout, atomic writes, the writer the
run loop uses and the reader the reports, ``export``, ``render`` and ``--resume`` open.

Layout::

    runs/NNNN-<slug>/
      config.toml            the RunConfig (everything needed to reproduce the run)
      state.json             status, committed generation count, pinned result, history, optimizer
      pinned.safetensors     the pinned conditioning + its recipe (metadata)
      targets/target_TT.png  targets/guide_GG.png
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

import io
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import tomllib

from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError

STATE_VERSION = 1
STATUSES = ("running", "finished", "interrupted")
STATE, CONFIG, PINNED = "state.json", "config.toml", "pinned.safetensors"


def generation_dirname(generation: int) -> str:
    """``3 -> "0003"``: the folder name of a generation inside ``generations/``."""
    return f"{generation:04d}"


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

def save_png(path: str | Path, image) -> Path:
    """Write an image [3, H, W] (torch or numpy, float in [0, 1]) as PNG, atomically."""
    from PIL import Image

    arr = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return save_image(path, Image.fromarray(arr.squeeze()))


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
    def create(cls, config: RunConfig, files: dict[str, object] | None = None) -> RunStore:
        """Make ``<out>/NNNN-<slug>/`` with config.toml and an initial state, all or nothing.

        ``files`` maps relative paths to images [3, H, W] (targets, guide) written with it.
        """
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".new-"))
        try:
            (tmp / "generations").mkdir()
            write_text(tmp / CONFIG, config.to_toml())
            for rel, img in (files or {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                save_png(tmp / rel, img)
            write_json(tmp / STATE, {"version": STATE_VERSION, "status": "running", "generation": 0,
                                                   "best": None, "history": [], "pareto": [], "optimizer": None,
                                                   "plain_validation": None})
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
        root = Path(path)
        if not (root / STATE).is_file() or not (root / CONFIG).is_file():
            raise InputError(f"{path}: not an embedpin run folder (no state.json / config.toml)")
        store = cls(root)
        store.clean()
        return store

    def clean(self) -> None:
        """Drop leftovers of an interrupted write: temp files and uncommitted generations."""
        done = self.read_state()["generation"]
        gens = self.root / "generations"
        for p in list(gens.iterdir()) if gens.is_dir() else []:
            if p.name.startswith(".") or (p.name.isdigit() and int(p.name) >= done):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def config(self) -> RunConfig:
        return RunConfig.from_toml(self.root / CONFIG)

    def read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.state_path}: unreadable run state: {e}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"{self.state_path}: unknown run-state version")
        return state

    def write_state(self, state: dict) -> None:
        write_json(self.state_path, state, allow_nan=True)  # optimizer state may hold Infinity

    # -- generations -----------------------------------------------------------------
    def begin_generation(self, g: int) -> Path:
        """A fresh temporary folder to assemble generation ``g`` in."""
        tmp = self.root / "generations" / f".{g:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        return tmp

    def finish_generation(self, g: int, tmp: Path, record: dict) -> Path:
        """Write generation.json, then move the folder into place (atomic rename)."""
        write_json(tmp / "generation.json", record)
        final = self.generation_dir(g)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final

    def read_generation(self, g: int) -> dict:
        return json.loads((self.generation_dir(g) / "generation.json").read_text())

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
        return RunConfig.from_dict(tomllib.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ConfigError) as e:
        raise InputError(f"unreadable run config {path}: {e}") from None


@dataclass(frozen=True)
class Run:
    """One run folder: its recipe, its state and lazily its generations' records."""

    root: Path
    config: RunConfig | None
    state: dict

    @property
    def status(self) -> str:
        return self.state.get("status", "running")

    @property
    def live(self) -> bool:
        """True while the run loop is still going (pages refresh themselves)."""
        return self.status == "running"

    @property
    def count(self) -> int:
        """Number of completed generations (0 .. count-1 are on disk)."""
        return int(self.state.get("generation", len(self.history)))

    @property
    def history(self) -> list[dict]:
        return list(self.state.get("history") or [])

    @property
    def best(self) -> dict | None:
        return self.state.get("best") or None

    @property
    def pareto(self) -> list[dict]:
        return list(self.state.get("pareto") or [])

    @property
    def id(self) -> str:
        return self.root.name

    def generation_dir(self, generation: int) -> Path:
        return self.root / "generations" / generation_dirname(generation)

    def generation(self, generation: int) -> dict:
        """The record ``generations/NNNN/generation.json`` (validated shape)."""
        return _check_generation(read_json(self.generation_dir(generation) / "generation.json"), generation)

    @cached_property
    def generations(self) -> list[int]:
        """Generations with a record on disk, in order."""
        found = sorted(int(p.parent.name) for p in self.root.glob("generations/[0-9]*/generation.json")
                       if p.parent.name.isdigit())
        return found


def _check_generation(record: dict, generation: int) -> dict:
    candidates = record.get("candidates")
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        raise InputError(f"malformed record of generation {generation}: 'candidates' must be a list of objects")
    for c in candidates:
        if "index" not in c or "loss" not in c:
            raise InputError(f"malformed record of generation {generation}: a candidate lacks 'index' or 'loss'")
    return record


def load_run(run_dir: str | Path) -> Run:
    """Open ``run_dir`` for reporting, or raise InputError if it is not a run folder."""
    root = Path(run_dir)
    if not root.is_dir():
        raise InputError(f"no run folder at {root}")
    if not (root / STATE).exists():
        raise InputError(f"{root} is not a run folder (no state.json)")
    state = read_json(root / STATE)
    if state.get("status", "running") not in STATUSES:
        raise InputError(f"malformed {root / 'state.json'}: unknown status {state.get('status')!r}")
    if not isinstance(state.get("history", []), list):
        raise InputError(f"malformed {root / 'state.json'}: 'history' must be a list")
    return Run(root=root, config=read_config(root / CONFIG), state=state)
