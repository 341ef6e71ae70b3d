"""The pinning run: ask -> decode -> build -> render -> score -> tell -> validate -> commit -> report.

A generation is committed as a whole (images, generation.json, then state.json with the
optimizer's JSON state); a run killed at any moment resumes from its last committed
generation and ends where an uninterrupted run would have. Within a generation all
candidates are rendered on the same seeds (common random numbers: they are compared on
the same noise); across generations the seeds rotate (``--search-seeds``,
``evaluation.seeds``), and are a function of (run seed, generation), so nothing but the
optimizer state needs saving to continue exactly.

Validation: every generation's best candidate, and the distribution's mean (the point
the candidates were drawn around) in the first generation (the search's starting point)
and the last, are rendered as plain batches on the run's validation seeds, which the
search never renders with; the pinned result is the validated candidate with the lowest
validation loss: what a user rendering it on new seeds is most likely to see, rather
than the luckiest fit to the search's own noise. The plain prompt is validated once, on
the same seeds, as the run's reference, and is the pinned result until a candidate beats
it there: a run never hands back something that does worse than the prompt it was given.

Where candidates render is the evaluator's business (``evaluation.evaluate``: in this process,
or on Ray workers with ``--workers`` / ``--ray-address``). The loop keeps the optimizer, every
seed, the store and the reports, and sees only compact batches (``evaluation.batch``), so a run's
result does not depend on where its candidates rendered. A mistake that ends a run midway (every
worker lost, a run folder that fills up or turns read-only) leaves it resumable from its last
committed generation, with one ``error:`` line; Ctrl-C stops after the current generation, a
second Ctrl-C at once, both leaving it resumable the same way.

The loop is :class:`PinningRun`, one object per run (or resume) holding the setup, the evaluator,
the store, the state and the optimizer; it prints nothing. What it has to say goes to the hooks
its caller passes (``events.RunHooks``; none: it runs silently): the CLI's are the terminal's
(``terminal.Terminal``: progress bar, notes, the answer to Ctrl-C), a host application's (ComfyUI)
its own progress bar and stop button.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np

from embedpin.config import RunConfig, ScaleConfig
from embedpin.errors import EmbedpinError, StoreError
from embedpin.evaluation.batch import Batch, Starts
from embedpin.evaluation.evaluate import Evaluator, open_evaluator
from embedpin.evaluation.inversion import NoGradient
from embedpin.evaluation.setup import RunSetup, input_digests
from embedpin.events import RunHooks, StopRun
from embedpin.exports import save_pinned
from embedpin.guidance.blocks import FILE_BLOCKS
from embedpin.optimizer.cmaes import CMAES, POLISH_GENERATIONS, default_generations
from embedpin.optimizer.mo import MOCMAES
from embedpin.reports.builder import update
from embedpin.reports.pages import folder_argument, usage_commands
from embedpin.scoring.aggregate import WORST_LOSS
from embedpin.store import (
    INVERSION,
    PAGE,
    PINNED,
    CandidateRecord,
    FileRecord,
    GenerationRecord,
    HistoryEntry,
    InversionRecord,
    PinnedRecord,
    PlainValidation,
    RunState,
    RunStore,
    StartRecord,
    candidate_image,
    errmap_image,
    in_generation,
    keeps_previews,
    read_vectors,
    save_render,
    validation_image,
    write_vectors,
)

__all__ = ["PinningRun", "RunHooks", "RunResult", "StopRun", "file_exact", "load_optimizer", "make_optimizer", "resume", "run",
           "total_generations"]


@dataclass
class RunResult:
    """best_loss: the pinned result's loss (its validation loss when validation is on);
    validation_loss / plain_validation_loss: the pinned result's and the plain prompt's
    loss on the validation seeds (None without validation); file_validation_loss: the
    textual-inversion file's, rendered from the file and its usage prompt alone (None: no
    file beat the plain prompt, or no validation); renders: images rendered,
    validation included; workers: per-worker counts on Ray workers (None in-process)."""

    run_dir: Path
    best_loss: float
    first_best_loss: float
    generations: int
    renders: int
    interrupted: bool = False
    stop_reason: str = ""
    validation_loss: float | None = None
    plain_validation_loss: float | None = None
    file_validation_loss: float | None = None
    pinned: dict | None = field(default=None, repr=False)  # the pinned tensors (filled in by embedpin.api)
    workers: list[dict] | None = None

    def describe(self) -> str:
        """What a person reads at the end: where the run is and how the result did."""
        if self.validation_loss is not None and self.plain_validation_loss:
            how = (f"validation loss {self.validation_loss:.4f} against the plain prompt's "
                   f"{self.plain_validation_loss:.4f} ({self.validation_loss / self.plain_validation_loss:.2f}x) "
                   f"on seeds the search never used")
        else:
            how = f"loss {self.best_loss:.4f} on the search's own seeds"
        where = folder_argument(self.run_dir)
        lines = [f"run folder: {self.run_dir}", f"pinned result: {how}"]
        if self.file_validation_loss is not None and self.plain_validation_loss:
            lines.append(f"textual-inversion file alone: validation loss {self.file_validation_loss:.4f} "
                         f"({self.file_validation_loss / self.plain_validation_loss:.2f}x the plain prompt's)")
        elif self.validation_loss is not None:
            lines.append("textual-inversion file: none beat the plain prompt on the validation seeds")
        lines.append(f"report: {self.run_dir / PAGE}")
        if self.interrupted:
            lines.append(f"continue it: embedpin optimize --resume {where}")
        return "\n".join([*lines, "use it:", *(f"  {c}" for c in usage_commands(where))])

    def summary(self) -> dict:
        out = {"run_dir": str(self.run_dir), "best_loss": self.best_loss, "first_best_loss": self.first_best_loss,
               "generations": self.generations, "renders": self.renders, "interrupted": self.interrupted,
               "stop_reason": self.stop_reason, "validation_loss": self.validation_loss,
               "plain_validation_loss": self.plain_validation_loss, "file_validation_loss": self.file_validation_loss}
        return out if self.workers is None else {**out, "workers": self.workers}


def make_optimizer(setup: RunSetup):
    optim = setup.config.optim
    x0 = setup.space.x0()
    if optim.max_distance is not None:
        return MOCMAES(x0, optim.sigma0, seed=optim.seed, max_distance=optim.max_distance,
                       **({"lambda_": optim.population} if optim.population else {}))
    return CMAES(x0, optim.sigma0, seed=optim.seed, lambda_=optim.population)


def load_optimizer(state: dict):
    return (MOCMAES if "mocmaes" in str(state.get("format", "")) or "parents" in state else CMAES).from_state(state)


def total_generations(setup: RunSetup, opt) -> int:
    """The run's generations: the config's, else 8 where an inversion stage gave the search its
    start (it polishes), else 16 floor(ln N) (``optimizer.cmaes.default_generations``)."""
    c = setup.config
    return c.optim.generations or (POLISH_GENERATIONS if c.inverts() else default_generations(opt.n))


class _Interrupt:
    """First Ctrl-C: stop after the current generation's writes (``hooks.stopping()`` says so).
    Second: stop now. Later ones are ignored while the run writes that it stopped (the stop itself
    is never cut short). Signals reach only the main thread: a run on another thread, a host
    application's, is stopped by its hooks."""

    def __init__(self, hooks: RunHooks):
        self.hooks = hooks
        self.requested = self.now = False

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self._old = signal.signal(signal.SIGINT, self._handle) if main else None
        return self

    def _handle(self, *_):
        if self.now:
            return
        if self.requested:
            self.now = True
            raise KeyboardInterrupt
        self.requested = True
        self.hooks.stopping()

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def run(config: RunConfig, scale: ScaleConfig | None = None, evaluator: Evaluator | None = None, components=None,
        hooks: RunHooks | None = None) -> RunResult:
    """Start a new run: validate and load everything (in the workers, with ``scale``), then create
    the run folder and loop. ``evaluator``: render with this one instead (the caller closes it);
    ``components``: render in this process with a model already loaded (a host application's);
    ``hooks``: who hears the run's events and may stop it (:class:`RunHooks`: a terminal's progress
    bar, a host application's; None: nobody)."""
    config.validate()
    hooks = hooks or RunHooks()
    with _evaluator(config, scale, evaluator, hooks.note, components) as ev:
        setup = RunSetup.make(ev.info, ev.device)
        store = RunStore.create(setup.config, setup.files(), input_digests(setup.config))  # (model defaults filled in)
        state = store.read_state()
        state.space = ev.info.space
        state.notes = ev.info.notes or None
        state.tokens = ev.info.tokens or None
        return PinningRun(setup, ev, store, state, make_optimizer(setup), hooks).loop()


def resume(run_dir: str | Path, scale: ScaleConfig | None = None, evaluator: Evaluator | None = None, components=None,
           hooks: RunHooks | None = None) -> RunResult:
    """Continue a stopped run from its last committed generation (on any number of workers, or
    with ``components`` / ``hooks`` as :func:`run` takes them); refused when an input file is not
    the one the run started with."""
    store = RunStore.open(run_dir)
    state = store.read_state()
    config = store.config()
    store.check_inputs(input_digests(config))
    hooks = hooks or RunHooks()
    with _evaluator(config, scale, evaluator, hooks.note, components) as ev:
        setup = RunSetup.make(ev.info, ev.device)
        opt = load_optimizer(state.optimizer) if state.optimizer else make_optimizer(setup)
        return PinningRun(setup, ev, store, state, opt, hooks).loop()


@contextmanager
def _evaluator(config: RunConfig, scale: ScaleConfig | None, given: Evaluator | None,
               notify: Callable[[str], None], components=None):
    """``given``, or an evaluator opened for ``scale`` (or ``components``) and closed on the way
    out (its Ray workers stopped, a Ray cluster it started shut down); ``notify``: where its notes go."""
    if given is not None:
        yield given
        return
    ev = open_evaluator(config, scale or ScaleConfig(), notify, components)
    try:
        yield ev
    finally:
        ev.close()


def _store_error(e: OSError, root: Path) -> StoreError:
    """An OSError of the run loop (its only file work is the run folder's) as one line for the user."""
    return StoreError(f"cannot write the run folder {root}: {e.strerror or e}")


class _Validated(NamedTuple):
    """A generation's candidates rendered on the validation seeds: their records, xs and batch."""
    records: list[CandidateRecord]
    xs: list[np.ndarray]
    batch: Batch


@dataclass
class _Generation:
    """A generation in flight: its number ``g``, candidates X [λ, n], their batch and (finite)
    losses, which may be pinned (``eligible``), the distribution's mean when it is validated (the
    first and last generation) and when the generation started."""
    g: int
    X: np.ndarray
    batch: Batch
    losses: np.ndarray
    eligible: np.ndarray
    center: np.ndarray | None
    t0: float

    @property
    def best(self) -> int:
        """The generation's best candidate: the lowest loss among the eligible (any, when none is)."""
        if self.eligible.any():
            return int(np.argmin(np.where(self.eligible, self.losses, np.inf)))
        return int(np.argmin(self.losses))


class PinningRun:
    """One run's loop over its generations: the setup (``RunSetup``), the evaluator that renders,
    the run folder (``RunStore``), the committed state (``RunState``), the optimizer, and the hooks
    that hear what happens (``RunHooks``). Each generation asks, renders, tells, validates,
    commits, pins and reports (:meth:`generation`); ``state`` is always what was last committed
    plus the generation being committed."""

    def __init__(self, setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState, opt, hooks: RunHooks):
        self.setup, self.ev, self.store, self.state, self.opt, self.hooks = setup, ev, store, state, opt, hooks
        self.total = total_generations(setup, opt)

    def loop(self) -> RunResult:
        """The generations; a mistake that ends the run midway (every worker lost, the run folder
        unwritable) leaves it resumable from its last committed generation, marked interrupted where
        the folder can still be written, and is raised again naming the command that continues it."""
        try:
            return self._generations()
        except (EmbedpinError, OSError) as e:
            error = e if isinstance(e, EmbedpinError) else _store_error(e, self.store.root)
            self._mark_stopped(f"error: {error}")
            raise type(error)(f"{error}; the run stays resumable: embedpin optimize --resume {self.store.root}") \
                from None

    def _mark_stopped(self, reason: str) -> None:
        """Mark the run interrupted, if its folder can still be written (else it stays as last committed)."""
        try:
            state = self.store.read_state()
            state.status, state.stop_reason = "interrupted", reason
            self.store.write_state(state)
            self.report(None)
        except OSError:
            pass

    def _generations(self) -> RunResult:
        """Start (or go on), then search until the last generation, convergence or a stop: Ctrl-C
        (:class:`_Interrupt`), the host's ``stop()`` or :class:`StopRun`. A stopped run ends as
        last committed, interrupted unless it converged or had done all its generations."""
        self._start()
        self.hooks.begin(self.state.generation, self.total)
        reason = "generations"
        with _Interrupt(self.hooks) as stop:
            try:
                reason = self._search(stop)
            except (KeyboardInterrupt, StopRun):
                stop.requested = True
            finally:
                self.hooks.end()
            return self._finish(reason, stop.requested and reason != "converged")

    def _start(self) -> None:
        """Say the setup's notes (and route the evaluator's), mark the run running and say where it is."""
        for note in self.setup.info.notes:
            self.hooks.note(note)
        self.ev.notify = self.hooks.note
        self.state.status = "running"
        self.store.write_state(self.state)
        self.report(None)
        self.hooks.started(self.store.root)

    def _search(self, stop: _Interrupt) -> str:
        """The plain prompt's validation and the inversion stage where not done yet, then the
        generations; returns why they ended: "converged" or "generations" (all done, or stopped)."""
        if self.setup.validation is not None and self.state.plain_validation is None:
            self.render_plain_validation()
            self.store.write_state(self.state)
        self.inversion()
        while self.state.generation < self.total and not stop.requested:
            self.generation()
            if self.hooks.stop():
                stop.requested = True
                break
            if self.converged():
                return "converged"
        return "generations"

    def _finish(self, reason: str, stopped: bool) -> RunResult:
        """Record how the run ended, on its state as last committed (a generation stopped midway is not)."""
        self.state = state = self.store.read_state()
        interrupted = stopped and state.generation < self.total
        state.status = "interrupted" if interrupted else "finished"
        state.stop_reason = "interrupted" if interrupted else reason
        self.store.write_state(state)
        self.report(None)
        return self.result(interrupted)

    def result(self, interrupted: bool) -> RunResult:
        """The run's figures from its state: the pinned loss (a validation loss when the plain
        prompt was validated), the first generation's best, renders with validation included."""
        state, plain = self.state, self.state.plain_validation
        hist = state.history
        best = state.best.loss if state.best else math.nan
        return RunResult(
            run_dir=self.store.root, best_loss=best, first_best_loss=hist[0].best if hist else math.nan,
            generations=state.generation, renders=sum(h.renders for h in hist) + _validation_renders(state),
            interrupted=interrupted, stop_reason=state.stop_reason,
            validation_loss=best if plain is not None and state.best else None,
            plain_validation_loss=plain.loss if plain is not None else None,
            file_validation_loss=state.file.loss if state.file else None, workers=self.ev.workers)

    def inversion(self) -> None:
        """The gradient stage before the search (``--inversion-steps``): fit the token vectors to the
        targets once, keep them in the run folder, and start the search there; a resumed run reads
        them back (a run stopped during the stage does it again: it is a function of the config).
        A model without a gradient leaves the search gradient-free, from the init words."""
        done = self.state.inversion
        if done is not None and done.steps:
            self.ev.use_vectors(read_vectors(self.store.root / INVERSION))
        if done is not None or self.state.generation > 0:
            return
        losses: list[float] = []

        def progress(step: int, loss: float) -> None:
            losses.append(loss)
            self.hooks.inversion_step(step, loss)

        self.hooks.inversion_begin(self.setup.config.search.inversion_steps)
        t0 = time.time()
        try:
            starts = self.ev.invert(progress)
        except NoGradient as e:
            self.state.inversion = InversionRecord(steps=0, seconds=round(time.time() - t0, 3),
                                                   note=f"{e}: gradient-free only")
            self.store.write_state(self.state)
            self.hooks.note(f"{e}; the search goes on gradient-free from the init words")
            return
        finally:
            self.hooks.inversion_end()
        if starts is not None:
            self._start_from(starts, losses, t0)

    def _start_from(self, starts: Starts, losses: list[float], t0: float) -> None:
        """Choose the search's start among ``starts`` (the init words, then points of the
        inversion, its end last: :meth:`choose_start`), keep its vectors (``INVERSION``) and the
        stage's record (the mean denoising loss over the first and the last tenth of the steps);
        the search's x = 0 is now them."""
        k, validated = self.choose_start(starts)
        write_vectors(self.store.root / INVERSION, starts.vectors[k])
        tenth = max(1, len(losses) // 10)
        self.state.inversion = InversionRecord(steps=len(losses), seconds=round(time.time() - t0, 3),
                                               loss_start=float(np.mean(losses[:tenth])),
                                               loss_end=float(np.mean(losses[-tenth:])),
                                               start=starts.steps[k] if validated else None, starts=validated)
        self.store.write_state(self.state)
        self.ev.use_vectors(starts.vectors[k])
        self.hooks.inverted(self.state.inversion)

    def choose_start(self, starts: Starts) -> tuple[int, list[StartRecord] | None]:
        """The start with the lowest loss on the validation seeds (the search's x = 0 rendered with
        each one's vectors; ties: the later step) and every start's record; the inversion's end,
        unvalidated (None), where the run has no validation or ``--inversion-starts`` is 0."""
        if not self.setup.config.chooses_start():
            return len(starts.steps) - 1, None
        zero = np.zeros((1, self.setup.space.n))
        records = []
        for v, step in zip(starts.vectors, starts.steps):
            self.ev.use_vectors(v)
            batch = self.ev.evaluate(zero, self.setup.validation, f"inversion step {step} validation")
            records.append(StartRecord(step=step, loss=float(_finite(batch.loss)[0])))
        k = min(range(len(records)), key=lambda j: (records[j].loss, -j))
        return k, records

    def generation(self) -> None:
        """Generation ``state.generation``: ask, render and score (the evaluator), tell, then
        validate and commit it (:meth:`commit`), update the report and tell the hooks."""
        g, t0 = self.state.generation, time.time()
        X = self.opt.ask()                                    # 1. ask: X [λ, n]
        center = self.opt.stats()["mean"] if g in (0, self.total - 1) else None  # validated: the start and the end
        batch = self.ev.evaluate(X, self.setup.search_plan(g), f"generation {g}")  # 2-5. decode, build, render, score
        losses = _finite(batch.loss)
        self.opt.tell(X, losses, batch.distance)              # 6. tell
        self.commit(_Generation(g, X, batch, losses, self.eligible(batch.distance, losses), center, t0))  # 7-8.
        self.report(g)                                        # 8. report
        self.hooks.generation(self.state, None if self.ev.workers is None else self.ev.alive())
        self.hooks.progress(self.state.generation, self.total)

    def commit(self, gen: _Generation) -> None:
        """Generation g in four steps: build its folder and record (validation included), store
        it as a whole, pin the result it may improve, then write the state that names it."""
        tmp = self.store.begin_generation(gen.g)
        record, validated = self._generation_record(tmp, gen)
        self.store.finish_generation(gen.g, tmp, record)
        self.pin(gen, record, validated)
        stats = self.opt.stats()
        self.state.history.append(self._history_entry(stats, gen, record, validated))
        if stats["front"] is not None:
            self.state.pareto = stats["front"]
        self.state.generation = gen.g + 1
        self.state.optimizer = self.opt.to_state()
        self.store.write_state(self.state)

    def _generation_record(self, folder: Path, gen: _Generation) -> tuple[GenerationRecord, _Validated | None]:
        """Write the generation's images, error maps and validation renders into ``folder``;
        returns (its record, the validation or None)."""
        candidates = self._candidates(folder, gen)
        record = GenerationRecord(
            generation=gen.g, sigma=float(self.opt.sigma), best_candidate=gen.best,
            errmaps=self._error_maps(gen.batch.images[gen.best], folder), seed=self.setup.search_plan(gen.g).seed,
            candidates=candidates)
        validated = self.render_validation(folder, gen) if self.setup.validation is not None else None
        if validated:
            record.validation = validated.records
        return record, validated

    def _candidates(self, folder: Path, gen: _Generation) -> list[CandidateRecord]:
        """Each candidate's images (previews; full PNGs for the best one) and record."""
        lam, B = gen.batch.images.shape[:2]
        previews = keeps_previews(self.setup.config)
        out = []
        for i in range(lam):
            saved = [save_render(folder, candidate_image(i, b), gen.batch.images[i, b], previews, full=i == gen.best)
                     for b in range(B)]
            record = _candidate_record(gen.batch, i, gen.losses, [shown for shown, _ in saved])
            record.full = [full for _, full in saved] if saved[0][1] else None
            out.append(record)
        return out

    def _history_entry(self, stats: dict, gen: _Generation, record: GenerationRecord,
                       validated: _Validated | None) -> HistoryEntry:
        """The generation's line in ``state.history``: its losses, the optimizer's step size and
        shape, renders (validation included) and, on Ray workers, each worker's seconds."""
        best_i, batch = gen.best, gen.batch
        sorted_l = np.sort(gen.losses)
        lam, B = batch.images.shape[:2]
        v_renders = len(validated.records) * self.setup.validation.batch if validated else 0
        best = record.candidates[best_i]
        return HistoryEntry(
            generation=gen.g, best=float(gen.losses[best_i]), median=float(np.median(sorted_l)),
            worst=float(sorted_l[-1]), sigma=stats["sigma"], axis_ratio=stats["axis_ratio"],
            eigenvalues=stats["eigenvalues"], flip=best.flip, clip=best.clip, best_candidate=best_i,
            best_params=best.params, validation={v.kind: v.loss for v in validated.records} if validated else None,
            seconds=time.time() - gen.t0, renders=int(lam * B) + v_renders, validation_renders=v_renders,
            unet_evals=int(batch.unet_evals),
            workers=None if self.ev.workers is None else _worker_seconds([batch] + ([validated.batch] if validated
                                                                                    else [])))

    def pin(self, gen: _Generation, record: GenerationRecord, validated: _Validated | None) -> None:
        """The pinned result: the validation best (with validation), else the search's best."""
        best = record.candidates[gen.best]
        if validated:
            self.pin_validated(gen.g, validated)
        elif gen.eligible[gen.best] and (self.state.best is None or best.loss < self.state.best.loss):
            self.state.best = PinnedRecord(generation=gen.g, candidate=gen.best, loss=best.loss, flip=best.flip,
                                           clip=best.clip, distance=best.distance, params=best.params,
                                           x=[float(v) for v in gen.X[gen.best]])
            self.write_pinned()

    def pin_validated(self, g: int, validated: _Validated) -> None:
        """Pin the lowest validation loss among this generation's validated candidates if it
        beats the pinned result so far (within ``--max-distance`` with the size limiter), and keep
        the lowest all-in-vectors one as the run's textual-inversion file if it beats the file so
        far and the plain prompt."""
        eligible = [k for k, r in enumerate(validated.records) if r.eligible]
        pinned = self._pin_best(g, validated, eligible)
        if self._keep_file(g, validated, eligible) or pinned:
            self.write_pinned()

    def _pin_best(self, g: int, validated: _Validated, eligible: list[int]) -> bool:
        """The lowest-loss eligible validated record as ``state.best``, if it beats it; whether it did."""
        if not eligible:
            return False
        k = min(eligible, key=lambda j: validated.records[j].loss)
        r, best = validated.records[k], self.state.best
        if r.loss >= (math.inf if best is None or best.loss is None else best.loss):
            return False
        self.state.best = PinnedRecord(generation=g, candidate=r.index if r.kind == "best" else r.kind, kind=r.kind,
                                       loss=r.loss, flip=r.flip, clip=r.clip, distance=r.distance, params=r.params,
                                       images=r.images, image_losses=r.image_losses, validation=True,
                                       x=[float(v) for v in validated.xs[k]])
        return True

    def _keep_file(self, g: int, validated: _Validated, eligible: list[int]) -> bool:
        """The lowest-loss eligible record a file carries exactly (:func:`file_exact`) as ``state.file``,
        if it beats the file so far and the plain prompt; whether it did."""
        exact = [k for k in eligible if file_exact(self.setup, validated.records[k].params)]
        if not exact:
            return False
        k = min(exact, key=lambda j: validated.records[j].loss)
        r, plain, file = validated.records[k], self.state.plain_validation, self.state.file
        if r.loss >= (math.inf if file is None else file.loss) or (plain is not None and r.loss >= plain.loss):
            return False
        self.state.file = FileRecord(generation=g, kind=r.kind, loss=r.loss, x=[float(v) for v in validated.xs[k]],
                                     flip=r.flip, clip=r.clip, params=r.params, images=r.images,
                                     image_losses=r.image_losses)
        return True

    def render_validation(self, folder: Path, gen: _Generation) -> _Validated:
        """Render the generation's best candidate (and the distribution's mean) on the validation
        seeds, their images in ``folder/validation/``."""
        kinds = [("best", gen.best, gen.X[gen.best])] + ([("mean", None, gen.center)] if gen.center is not None
                                                         else [])
        xs = [x for _, _, x in kinds]
        batch = self.ev.evaluate(np.stack(xs), self.setup.validation, f"generation {gen.g} validation")
        losses = _finite(batch.loss)
        eligible = self.eligible(batch.distance, losses)
        records, previews = [], keeps_previews(self.setup.config)
        for k, (kind, index, _) in enumerate(kinds):
            names = [save_render(folder, validation_image(kind, b), img, previews)[0]
                     for b, img in enumerate(batch.images[k])]
            record = _candidate_record(batch, k, losses, [in_generation(gen.g, n) for n in names])
            record.index, record.kind, record.eligible = index, kind, bool(eligible[k])
            records.append(record)
        return _Validated(records, xs, batch)

    def render_plain_validation(self) -> None:
        """The plain prompt on the validation seeds: its record (images under ``validation/``),
        and the pinned result until a candidate beats it."""
        batch = self.ev.evaluate_plain(self.setup.validation)
        previews = keeps_previews(self.setup.config)
        names = [save_render(self.store.root, validation_image("plain", b), img, previews)[0]
                 for b, img in enumerate(batch.images[0])]
        plain = PlainValidation(
            loss=float(batch.loss[0]), flip=None if batch.flip is None else _num(batch.flip[0]),
            clip=None if batch.clip is None else _num(batch.clip[0]), image_losses=[_num(x) for x in batch.per_image[0]],
            images=names, seed=self.setup.validation.seed, renders=int(batch.images.shape[1]))
        self.state.plain_validation = plain
        if self.state.best is None:
            self.state.best = PinnedRecord(generation=None, candidate="plain", kind="plain", loss=plain.loss,
                                           flip=plain.flip, clip=plain.clip, distance=0.0, params={}, images=names,
                                           image_losses=plain.image_losses, validation=True)
            self.write_pinned()

    def eligible(self, distance: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Candidates that may become the pinned result: all of them, or with the size limiter
        (``--max-distance``) those within the distance. A generation with none eligible still
        reports its lowest loss but pins nothing."""
        limit = self.setup.config.optim.max_distance
        if limit is None:
            return np.ones(len(losses), dtype=bool)
        return np.asarray(distance, dtype=np.float64) <= limit

    def _error_maps(self, images: np.ndarray, folder: Path) -> list[str]:
        """The best candidate's ꟻLIP error maps (from its uint8 images) as magma PNGs; none in self mode."""
        maps = self.setup.error_maps(images)
        if maps is None:
            return []
        cmap, previews = matplotlib.colormaps["magma"], keeps_previews(self.setup.config)
        return [save_render(folder, errmap_image(b), cmap(m)[..., :3].transpose(2, 0, 1), previews)[0]
                for b, m in enumerate(maps)]

    def write_pinned(self) -> None:
        """The run's pinned result and textual-inversion file: their conditionings, built by the
        evaluator, in ``pinned.safetensors``."""
        best, file, plain = self.state.best, self.state.file, self.state.plain_validation
        x = best.x if best.x is not None else (self.setup.space.encode(best.params) if best.params else None)
        pinned = self.ev.pinned(None if x is None else np.asarray(x))
        save_pinned(self.store.root / PINNED, self.setup.config, self.setup.info, pinned, best,
                    None if file is None else (self.ev.pinned(np.asarray(file.x)), file), plain and plain.loss)

    def report(self, g: int | None) -> None:
        """The report's pages: generation ``g``'s and the run page (None: the run page alone)."""
        update(self.store.root, g)

    def converged(self) -> bool:
        """The optimizer's own stop (``--tol-fun`` / ``--tol-x``): the search has settled."""
        optim = self.setup.config.optim
        return bool(self.opt.should_stop(tol_fun=optim.tol_fun, tol_x=optim.tol_x))


def _validation_renders(state: RunState) -> int:
    """The renders of the plain prompt's validation and of the inversion's starts (each on the same seeds)."""
    plain = state.plain_validation
    if plain is None:
        return 0
    starts = state.inversion.starts if state.inversion is not None else None
    return plain.renders * (1 + len(starts or []))


def _finite(loss: np.ndarray) -> np.ndarray:
    """The losses, a non-finite one (a failed render) as the scorer writes it: ``WORST_LOSS``."""
    out = np.asarray(loss, dtype=np.float64)
    return np.where(np.isfinite(out), out, WORST_LOSS)


def _candidate_record(batch: Batch, i: int, losses: np.ndarray, images: list[str]) -> CandidateRecord:
    return CandidateRecord(
        index=i, loss=float(losses[i]), flip=None if batch.flip is None else _num(batch.flip[i]),
        clip=None if batch.clip is None else _num(batch.clip[i]), distance=_num(batch.distance[i]),
        params={k: [float(x) for x in np.atleast_1d(v[i])] for k, v in batch.params.items()},
        image_losses=[_num(x) for x in batch.per_image[i]], images=images,
        lineage=batch.lineage.tolist(), seeds=batch.seeds.tolist())


def _num(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _worker_seconds(batches: list[Batch]) -> dict[str, float]:
    """Seconds each worker spent on a generation's batches (its time split), in worker order."""
    total: dict[str, float] = {}
    for b in batches:
        for name, s in b.seconds.items():
            total[name] = total.get(name, 0.0) + s
    return {name: round(total[name], 3) for name in sorted(total)}


def file_exact(setup: RunSetup, params: dict[str, list[float]]) -> bool:
    """Whether a candidate with decoded ``params`` is all in its token vectors: every block a
    textual-inversion file cannot carry (``guidance.blocks.FILE_BLOCKS``) at its default."""
    defaults = {b.name: b.default for b in setup.space.blocks}
    return "token_vectors" in params and all(
        abs(v - defaults[name]) <= 1e-9 for name, values in params.items() if name not in FILE_BLOCKS for v in values)
