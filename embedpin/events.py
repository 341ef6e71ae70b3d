"""What a run tells whoever started it, and how they stop it (``runner.run(..., hooks=)``).

The run loop (``runner.PinningRun``) calls a :class:`RunHooks` at each step it has something to
say; it prints nothing itself. Here every event does nothing, so a library run is silent;
``terminal.Terminal`` shows them on a terminal (the CLI's progress bar, notes and Ctrl-C answer),
and a host application (ComfyUI's Pin node) passes its own ``progress`` and ``stop``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedpin.store import InversionRecord, RunState


class StopRun(Exception):
    """Raised by a host application's code while a run renders (``RunHooks``): stop now; the run
    stays resumable from its last committed generation, as after a second Ctrl-C."""


@dataclass
class RunHooks:
    """How a host application (a node in ComfyUI) follows and stops a run: ``progress(done,
    total)`` after each committed generation; ``stop()`` asked after each one (True: stop there,
    resumable). To stop within a generation, raise :class:`StopRun` from the host's own code
    (a UNet forward hook, say). The methods are the run's other events, in the order a run
    meets them; each does nothing here (``terminal.Terminal`` shows them)."""
    progress: Callable[[int, int], None] = lambda done, total: None
    stop: Callable[[], bool] = lambda: False

    def note(self, text: str) -> None:
        """Something the user should know: the setup's notes, an evaluator's (a worker lost)."""

    def started(self, run_dir: Path) -> None:
        """The run folder is written and marked running: where it is and where its report is."""

    def begin(self, done: int, total: int) -> None:
        """The run goes on from generation ``done`` of ``total`` (inversion stage first, if any)."""

    def inversion_begin(self, steps: int) -> None:
        """The gradient stage starts: ``steps`` steps."""

    def inversion_step(self, step: int, loss: float) -> None:
        """One inversion step done, with its denoising loss."""

    def inversion_end(self) -> None:
        """The gradient stage ended (done, given up for want of a gradient, or stopped)."""

    def inverted(self, record: InversionRecord) -> None:
        """The fitted vectors are kept: the search starts from them."""

    def generation(self, state: RunState, workers: tuple[int, int] | None) -> None:
        """A generation is committed (``state.history[-1]``); ``workers``: (ready, started) on
        Ray workers, None in-process. ``progress`` follows."""

    def end(self) -> None:
        """No more generations (done, converged, stopped, or a mistake)."""

    def stopping(self) -> None:
        """The first Ctrl-C: the run stops after this generation; a second stops it now."""
