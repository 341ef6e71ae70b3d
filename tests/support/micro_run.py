"""The small pinning run on the micro model that the end-to-end tests share (``finished`` in conftest)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAR = str(ROOT / "examples" / "star.png")
PROMPT = "a large star in the center"  # no colour, no background: the run must add what star.png has
SMALL = ["--inversion-steps", "4", "--generations", "3", "--population", "4", "--batch", "4", "--steps", "6",
         "--validation-seeds", "4", "--inversion-starts", "2",
         "--quiet"]


def optimize_args(out, *extra) -> list[str]:
    """``embedpin optimize`` arguments of the small run into ``out``, plus ``extra``."""
    return ["optimize", "--target", STAR, "--prompt", PROMPT, "--out", str(out), *SMALL, *extra]


def runs(out) -> list[Path]:
    """The run folders under ``out``, in order."""
    return sorted(p for p in Path(out).iterdir() if not p.name.startswith(".")) if Path(out).exists() else []


def timeless_state(path) -> dict:
    """A run's state.json without its wall clocks (each generation's and the inversion stage's
    ``seconds``): the only thing two identical runs differ in."""
    state = json.loads(Path(path).read_text())
    state["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]]
    if state.get("inversion"):
        state["inversion"] = {k: v for k, v in state["inversion"].items() if k != "seconds"}
    return state
