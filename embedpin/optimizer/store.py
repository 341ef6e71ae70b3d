"""The run store ``runs/<id>/``: config.toml, state.json, generations/NNNN/, pinned.safetensors.

Every write is atomic (temporary file in the same folder, then ``os.replace``); a
generation folder is assembled under a temporary name and renamed into place before
``state.json`` names it, so a run killed at any moment resumes from its last complete
generation. State is JSON, tensors are safetensors: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from embedpin.config import RunConfig
from embedpin.errors import InputError

STATE_VERSION = 1


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, allow_nan: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=allow_nan))


def save_png(path: str | Path, image) -> None:
    """Write an image [3, H, W] (torch or numpy, float in [0, 1]) as PNG, atomically."""
    import io

    from PIL import Image

    arr = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = (np.clip(np.nan_to_num(arr), 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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
        return self.root / "state.json"

    def generation_dir(self, g: int) -> Path:
        return self.root / "generations" / f"{g:04d}"

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
            atomic_write_text(tmp / "config.toml", config.to_toml())
            for rel, img in (files or {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                save_png(tmp / rel, img)
            atomic_write_json(tmp / "state.json", {"version": STATE_VERSION, "status": "running", "generation": 0,
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
        if not (root / "state.json").is_file() or not (root / "config.toml").is_file():
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
        return RunConfig.from_toml(self.root / "config.toml")

    def read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.state_path}: unreadable run state: {e}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise InputError(f"{self.state_path}: unknown run-state version")
        return state

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state, allow_nan=True)  # optimizer state may hold Infinity

    # -- generations -----------------------------------------------------------------
    def begin_generation(self, g: int) -> Path:
        """A fresh temporary folder to assemble generation ``g`` in."""
        tmp = self.root / "generations" / f".{g:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        return tmp

    def finish_generation(self, g: int, tmp: Path, record: dict) -> Path:
        """Write generation.json, then move the folder into place (atomic rename)."""
        atomic_write_json(tmp / "generation.json", record)
        final = self.generation_dir(g)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final

    def read_generation(self, g: int) -> dict:
        return json.loads((self.generation_dir(g) / "generation.json").read_text())
