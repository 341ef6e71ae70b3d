"""Read-only view of a run store (``runs/<id>/``) as the report needs it.

The run loop owns the store; this module only reads ``config.toml``, ``state.json``
and ``generations/NNNN/generation.json`` and turns a malformed or missing file into an
:class:`~embedpin.errors.InputError` with one clear line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import tomllib

from embedpin.errors import InputError

STATUSES = ("running", "finished", "interrupted")


def generation_dirname(generation: int) -> str:
    """``3 -> "0003"``: the folder name of a generation inside ``generations/``."""
    return f"{generation:04d}"


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


def read_config(path: Path) -> dict:
    """The recipe from ``config.toml`` (empty when the file is absent)."""
    if not Path(path).exists():
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"unreadable run config {path}: {e}") from None


@dataclass(frozen=True)
class Run:
    """One run folder: its recipe, its state and lazily its generations' records."""

    root: Path
    config: dict
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
    if not (root / "state.json").exists():
        raise InputError(f"{root} is not a run folder (no state.json)")
    state = read_json(root / "state.json")
    if state.get("status", "running") not in STATUSES:
        raise InputError(f"malformed {root / 'state.json'}: unknown status {state.get('status')!r}")
    if not isinstance(state.get("history", []), list):
        raise InputError(f"malformed {root / 'state.json'}: 'history' must be a list")
    return Run(root=root, config=read_config(root / "config.toml"), state=state)


def find_key(tree: Any, key: str) -> Any:
    """The first non-table value named ``key`` in a nested config (top level first, then sections)."""
    if not isinstance(tree, dict):
        return None
    if key in tree and not isinstance(tree[key], dict):
        return tree[key]
    for value in tree.values():
        found = find_key(value, key)
        if found is not None:
            return found
    return None
