"""The small pinning run on the micro model that the end-to-end tests share (``finished`` in conftest)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAR = str(ROOT / "examples" / "star.png")
PROMPT = "a large star in the center"  # no colour, no background: the run must add what star.png has
SMALL = ["--inversion-steps", "4", "--generations", "3", "--population", "4", "--batch", "4", "--steps", "6",
         "--validation-seeds", "4",
         "--quiet"]


def optimize_args(out, *extra) -> list[str]:
    """``embedpin optimize`` arguments of the small run into ``out``, plus ``extra``."""
    return ["optimize", "--target", STAR, "--prompt", PROMPT, "--out", str(out), *SMALL, *extra]


def runs(out) -> list[Path]:
    """The run folders under ``out``, in order."""
    return sorted(p for p in Path(out).iterdir() if not p.name.startswith(".")) if Path(out).exists() else []
