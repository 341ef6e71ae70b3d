"""A run on a terminal: the run's events (``events.RunHooks``) as a person at the terminal reads them.

On stderr: the notes (above the progress bar) and, when the run starts, its folder and report;
a progress bar over the inversion's steps, then over the generations, with the pinned and file
losses (and the Ray workers ready); on stdout: one line per committed generation, and the answer
to the first Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from embedpin.events import RunHooks
from embedpin.store import PAGE, InversionRecord, RunState

STOPPING = "\nstopping after this generation (Ctrl-C again to stop now; the run stays resumable)"


class Terminal(RunHooks):
    """The terminal of the CLI and of ``embedpin.optimize``. ``quiet``: nothing but the
    answer to Ctrl-C (whoever pressed it learns what it does). ``host``: a host application's
    hooks, whose ``progress`` and ``stop`` it passes on."""

    def __init__(self, quiet: bool = False, host: RunHooks | None = None):
        host = host or RunHooks()
        super().__init__(progress=host.progress, stop=host.stop)
        self.quiet = quiet
        self.bar = self.steps = None

    def note(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(f"note: {text}", file=sys.stderr)

    def started(self, run_dir: Path) -> None:
        if not self.quiet:
            print(f"run folder: {run_dir}\nreport: {run_dir / PAGE} (open it now: it refreshes itself "
                  f"while the run goes)", file=sys.stderr, flush=True)

    def begin(self, done: int, total: int) -> None:
        self.bar = tqdm(total=total, initial=done, disable=self.quiet, unit="gen", dynamic_ncols=True)

    def inversion_begin(self, steps: int) -> None:
        self.steps = tqdm(total=steps, disable=self.quiet, unit="step", desc="inversion", dynamic_ncols=True,
                          leave=False)

    def inversion_step(self, step: int, loss: float) -> None:
        self.steps.set_postfix(refresh=False, loss=f"{loss:.4f}")
        self.steps.update(1)

    def inversion_end(self) -> None:
        self.steps.close()

    def inverted(self, record: InversionRecord) -> None:
        if not self.quiet:
            tqdm.write(f"inversion: {record.steps} steps in {record.seconds:.0f}s, denoising loss "
                       f"{record.loss_start:.4f} -> {record.loss_end:.4f}; {_start(record)}", file=sys.stderr)

    def generation(self, state: RunState, workers: tuple[int, int] | None) -> None:
        """The bar's figures: the pinned result's and the file's loss (and the workers ready); the
        generation's line: its best and median loss, its validated losses beside the plain prompt's
        and the file's, the step size and its seconds."""
        h, best = state.history[-1], state.best
        shown = {"pinned": "-" if best is None else f"{best.loss:.4f}", "file": "-" if state.file is None else
                 f"{state.file.loss:.4f}"}
        if workers is not None:
            shown["workers"] = "{}/{}".format(*workers)
        self.bar.set_postfix(refresh=False, **shown)
        self.bar.update(1)
        if not self.quiet:
            val = "".join(f"  val {k} {x:.4f}" for k, x in (h.validation or {}).items())
            plain = state.plain_validation
            ref = f" (plain {plain.loss:.4f})" if plain else ""
            ref += f"  file {state.file.loss:.4f}" if state.file else ""
            self.bar.write(f"gen {h.generation:4d}  best {h.best:.4f}  median {h.median:.4f}{val}{ref}  "
                           f"sigma {h.sigma:.3g}  ({h.seconds:.1f}s)")

    def end(self) -> None:
        self.bar.close()

    def stopping(self) -> None:
        print(STOPPING, flush=True)


def _start(record: InversionRecord) -> str:
    """Where the search starts, and the validation losses it was chosen on."""
    if not record.starts:
        return "the search starts at its end"
    where = "the init words" if record.start == 0 else f"step {record.start}"
    losses = ", ".join(f"{'init words' if r.step == 0 else r.step} {r.loss:.4f}" for r in record.starts)
    return f"the search starts at {where} (validation loss: {losses})"
