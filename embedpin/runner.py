"""The pinning run: ask -> decode -> build -> render -> score -> tell -> validate -> commit -> report.

A generation is committed as a whole (images, generation.json, then state.json with the
optimizer's JSON state); a run killed at any moment resumes from its last committed
generation and ends where an uninterrupted run would have. Within a generation all
candidates are rendered on the same seeds (common random numbers: they are compared on
the same noise); across generations the seeds rotate (``--search-seeds``,
``optimizer.seeds``), and are a function of (run seed, generation), so nothing but the
optimizer state needs saving to continue exactly.

Validation: every generation's best candidate, and the distribution's mean (the point
the candidates were drawn around) in the first generation (the search's starting point)
and the last, are rendered as plain batches on the run's validation seeds, which the
search never renders with; the pinned result is the validated candidate with the lowest
validation loss: what a user rendering it on new seeds is most likely to see, rather
than the luckiest fit to the search's own noise. The plain prompt is validated once, on
the same seeds, as the run's reference, and is the pinned result until a candidate beats
it there: a run never hands back something that does worse than the prompt it was given.

Where candidates render is the evaluator's business (``optimizer.evaluate``: in this process,
or on Ray workers with ``--workers`` / ``--ray-address``). The loop keeps the optimizer, every
seed, the store and the reports, and sees only compact batches (``optimizer.batch``), so a run's
result does not depend on where its candidates rendered. A mistake that ends a run midway (every
worker lost, a run folder that fills up or turns read-only) leaves it resumable from its last
committed generation, with one ``error:`` line; Ctrl-C stops after the current generation, a
second Ctrl-C at once, both leaving it resumable the same way.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from tqdm import tqdm

from embedpin.config import RunConfig, ScaleConfig
from embedpin.errors import EmbedpinError, StoreError
from embedpin.guidance.blocks import FILE_BLOCKS
from embedpin.optimizer.batch import Batch
from embedpin.optimizer.cmaes import CMAES, POLISH_GENERATIONS, default_generations
from embedpin.optimizer.evaluate import Evaluator, open_evaluator
from embedpin.optimizer.inversion import NoGradient
from embedpin.optimizer.mo import MOCMAES
from embedpin.optimizer.setup import RunSetup, input_digests
from embedpin.pinned import save_pinned
from embedpin.reports.builder import update
from embedpin.reports.pages import folder_argument, usage_commands
from embedpin.store import (
    INVERSION,
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
    candidate_image,
    errmap_image,
    generation_dirname,
    keeps_previews,
    read_vectors,
    save_render,
    validation_image,
    write_vectors,
)


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
        lines.append(f"report: {self.run_dir / 'index.html'}")
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


class StopRun(Exception):
    """Raised by a host application's code while a run renders (``RunHooks``): stop now; the run
    stays resumable from its last committed generation, as after a second Ctrl-C."""


@dataclass
class RunHooks:
    """How a host application (a node in ComfyUI) follows and stops a run: ``progress(done,
    total)`` after each committed generation; ``stop()`` asked after each one (True: stop there,
    resumable). To stop within a generation, raise :class:`StopRun` from the host's own code
    (a UNet forward hook, say)."""
    progress: Callable[[int, int], None] = lambda done, total: None
    stop: Callable[[], bool] = lambda: False


class _Interrupt:
    """First Ctrl-C: stop after the current generation's writes. Second: stop now. Later ones are
    ignored while the run writes that it stopped (the stop itself is never cut short). Signals reach
    only the main thread: a run on another thread, a host application's, is stopped by its hooks."""

    def __init__(self):
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
        print("\nstopping after this generation (Ctrl-C again to stop now; the run stays resumable)", flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def run(config: RunConfig, quiet: bool = False, scale: ScaleConfig | None = None,
        evaluator: Evaluator | None = None, components=None, hooks: RunHooks | None = None) -> RunResult:
    """Start a new run: validate and load everything (in the workers, with ``scale``), then create
    the run folder and loop. ``evaluator``: render with this one instead (the caller closes it);
    ``components``: render in this process with a model already loaded (a host application's);
    ``hooks``: a host application's progress and stop (:class:`RunHooks`)."""
    config.validate()
    with _evaluator(config, scale, evaluator, quiet, components) as ev:
        setup = RunSetup.make(ev.info, ev.device)
        store = RunStore.create(setup.config, setup.files(), input_digests(setup.config))  # (model defaults filled in)
        state = store.read_state()
        state.space = ev.info.space
        state.notes = ev.info.notes or None
        state.tokens = ev.info.tokens or None
        return _loop(setup, ev, store, make_optimizer(setup), state, quiet, hooks or RunHooks())


def resume(run_dir: str | Path, quiet: bool = False, scale: ScaleConfig | None = None,
           evaluator: Evaluator | None = None, components=None, hooks: RunHooks | None = None) -> RunResult:
    """Continue a stopped run from its last committed generation (on any number of workers, or
    with ``components`` / ``hooks`` as :func:`run` takes them); refused when an input file is not
    the one the run started with."""
    store = RunStore.open(run_dir)
    state = store.read_state()
    config = store.config()
    store.check_inputs(input_digests(config))
    with _evaluator(config, scale, evaluator, quiet, components) as ev:
        setup = RunSetup.make(ev.info, ev.device)
        opt = load_optimizer(state.optimizer) if state.optimizer else make_optimizer(setup)
        return _loop(setup, ev, store, opt, state, quiet, hooks or RunHooks())


@contextmanager
def _evaluator(config: RunConfig, scale: ScaleConfig | None, given: Evaluator | None, quiet: bool, components=None):
    """``given``, or an evaluator opened for ``scale`` (or ``components``) and closed on the way
    out (its Ray workers stopped, a Ray cluster it started shut down)."""
    if given is not None:
        yield given
        return
    ev = open_evaluator(config, scale or ScaleConfig(), _notes(quiet), components)
    try:
        yield ev
    finally:
        ev.close()


def _loop(setup: RunSetup, ev: Evaluator, store: RunStore, opt, state: RunState, quiet: bool,
          hooks: RunHooks) -> RunResult:
    """The generations; a mistake that ends the run midway (every worker lost, the run folder
    unwritable) leaves it resumable from its last committed generation, marked interrupted where
    the folder can still be written, and is raised again naming the command that continues it."""
    try:
        return _generations(setup, ev, store, opt, state, quiet, hooks)
    except (EmbedpinError, OSError) as e:
        error = e if isinstance(e, EmbedpinError) else _store_error(e, store.root)
        _mark_stopped(store, f"error: {error}")
        raise type(error)(f"{error}; the run stays resumable: embedpin optimize --resume {store.root}") from None


def _store_error(e: OSError, root: Path) -> StoreError:
    """An OSError of the run loop (its only file work is the run folder's) as one line for the user."""
    return StoreError(f"cannot write the run folder {root}: {e.strerror or e}")


def _mark_stopped(store: RunStore, reason: str) -> None:
    """Mark the run interrupted, if its folder can still be written (else it stays as last committed)."""
    try:
        state = store.read_state()
        state.status, state.stop_reason = "interrupted", reason
        store.write_state(state)
        _report(store, None)
    except OSError:
        pass


def _generations(setup: RunSetup, ev: Evaluator, store: RunStore, opt, state: RunState, quiet: bool,
                 hooks: RunHooks) -> RunResult:
    total = total_generations(setup, opt)
    for note in setup.info.notes if not quiet else []:
        print(f"note: {note}", file=sys.stderr)
    ev.notify = _notes(quiet)
    state.status = "running"
    store.write_state(state)
    _report(store, None)
    if not quiet:
        print(f"run folder: {store.root}\nreport: {store.root / 'index.html'} (open it now: it refreshes itself "
              f"while the run goes)", file=sys.stderr, flush=True)
    bar = tqdm(total=total, initial=state.generation, disable=quiet, unit="gen", dynamic_ncols=True)
    reason = "generations"
    with _Interrupt() as stop:
        try:
            if setup.validation is not None and state.plain_validation is None:
                _validate_plain(setup, ev, store, state)
                store.write_state(state)
            _inversion(setup, ev, store, state, quiet)
            while state.generation < total and not stop.requested:
                g = state.generation
                t0 = time.time()
                X = opt.ask()                                    # 1. ask: X [λ, n]
                center = opt.stats()["mean"] if g in (0, total - 1) else None  # validated: the start and the end
                batch = ev.evaluate(X, setup.search_plan(g), f"generation {g}")  # 2-5. decode, build, render, score
                losses = _finite(batch.loss)
                opt.tell(X, losses, batch.distance)              # 6. tell
                _commit(setup, ev, store, state, opt, g, batch, losses, X, center, t0)  # 7-8. validate, commit
                _report(store, g)                                # 8. report
                _progress(bar, state, ev, quiet)
                hooks.progress(state.generation, total)
                if hooks.stop():
                    stop.requested = True
                    break
                if _converged(setup, opt, state):
                    reason = "converged"
                    break
        except (KeyboardInterrupt, StopRun):
            stop.requested = True
        finally:
            bar.close()
        state = store.read_state()  # as last committed (a generation stopped midway is not)
        interrupted = stop.requested and reason != "converged" and state.generation < total
        state.status = "interrupted" if interrupted else "finished"
        state.stop_reason = "interrupted" if interrupted else reason
        store.write_state(state)
        _report(store, None)
    hist, plain = state.history, state.plain_validation
    best = state.best.loss if state.best else math.nan
    validated = plain is not None
    return RunResult(store.root, best, hist[0].best if hist else math.nan, state.generation,
                     sum(h.renders for h in hist) + (plain.renders if validated else 0), interrupted, state.stop_reason,
                     best if validated and state.best else None, plain.loss if validated else None,
                     state.file.loss if state.file else None, workers=ev.workers)


def _inversion(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState, quiet: bool) -> None:
    """The gradient stage before the search (``--inversion-steps``): fit the token vectors to the
    targets once, keep them in the run folder, and start the search there; a resumed run reads
    them back (a run stopped during the stage does it again: it is a function of the config)."""
    path = store.root / INVERSION
    if state.inversion is not None:
        if state.inversion.steps:
            ev.use_vectors(read_vectors(path))
        return
    if state.generation > 0:
        return
    losses: list[float] = []
    steps = setup.config.search.inversion_steps
    bar = tqdm(total=steps, disable=quiet, unit="step", desc="inversion", dynamic_ncols=True, leave=False)

    def progress(step: int, loss: float) -> None:
        losses.append(loss)
        bar.set_postfix(refresh=False, loss=f"{loss:.4f}")
        bar.update(1)

    t0 = time.time()
    try:
        vectors = ev.invert(progress)
    except NoGradient as e:
        state.inversion = InversionRecord(steps=0, seconds=round(time.time() - t0, 3), note=f"{e}: gradient-free only")
        store.write_state(state)
        _notes(quiet)(f"{e}; the search goes on gradient-free from the init words")
        return
    finally:
        bar.close()
    if vectors is None:
        return
    write_vectors(path, vectors)
    tenth = max(1, len(losses) // 10)
    state.inversion = InversionRecord(steps=len(losses), seconds=round(time.time() - t0, 3),
                                      loss_start=float(np.mean(losses[:tenth])), loss_end=float(np.mean(losses[-tenth:])))
    store.write_state(state)
    ev.use_vectors(vectors)
    if not quiet:
        tqdm.write(f"inversion: {len(losses)} steps in {state.inversion.seconds:.0f}s, denoising loss "
                   f"{state.inversion.loss_start:.4f} -> {state.inversion.loss_end:.4f}; the search starts there",
                   file=sys.stderr)


def _notes(quiet: bool):
    """Where an evaluator's notes (a worker lost, restarted) go: above the progress bar, on stderr."""
    if quiet:
        return lambda message: None
    return lambda message: tqdm.write(f"note: {message}", file=sys.stderr)


def _finite(loss: np.ndarray) -> np.ndarray:
    out = np.asarray(loss, dtype=np.float64)
    worst = np.nanmax(np.where(np.isfinite(out), out, np.nan)) if np.isfinite(out).any() else 1e9
    return np.where(np.isfinite(out), out, max(worst * 2, 1e9) if worst > 0 else 1e9)


def _converged(setup: RunSetup, opt, state: RunState) -> bool:
    optim = setup.config.optim
    return bool(opt.should_stop(tol_fun=optim.tol_fun, tol_x=optim.tol_x))


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


def _commit(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState, opt, g: int, batch: Batch,
            losses: np.ndarray, X: np.ndarray, center: np.ndarray | None, t0: float) -> None:
    """Generation g in four steps: build its folder and record (validation included), store
    it as a whole, pin the result it may improve, then write the state that names it."""
    tmp = store.begin_generation(g)
    eligible = _eligible(setup, batch.distance, losses)
    best_i = int(np.argmin(np.where(eligible, losses, np.inf))) if eligible.any() else int(np.argmin(losses))
    record, validated = _generation_record(setup, ev, tmp, opt, g, batch, losses, X, best_i, center)
    store.finish_generation(g, tmp, record)
    _pin(setup, ev, store, state, g, X[best_i], record, eligible[best_i], validated)
    stats = opt.stats()
    state.history.append(_history_entry(setup, ev, stats, g, batch, losses, record, validated, t0))
    if stats["front"] is not None:
        state.pareto = stats["front"]
    state.generation = g + 1
    state.optimizer = opt.to_state()
    store.write_state(state)


def _generation_record(setup: RunSetup, ev: Evaluator, folder: Path, opt, g: int, batch: Batch, losses: np.ndarray,
                       X: np.ndarray, best_i: int, center: np.ndarray | None):
    """Write the generation's images, error maps and validation renders into ``folder``;
    returns (its record, the validation (records, xs, batch) or None)."""
    lam, B = batch.images.shape[:2]
    previews = keeps_previews(setup.config)
    candidates = []
    for i in range(lam):
        saved = [save_render(folder, candidate_image(i, b), batch.images[i, b], previews, full=i == best_i)
                 for b in range(B)]
        record = _candidate_record(batch, i, losses, [shown for shown, _ in saved])
        record.full = [full for _, full in saved] if saved[0][1] else None
        candidates.append(record)
    record = GenerationRecord(
        generation=g, sigma=float(opt.sigma), best_candidate=best_i,
        errmaps=_error_maps(setup, batch.images[best_i], folder), seed=setup.search_plan(g).seed,
        candidates=candidates)
    validated = _validate(setup, ev, folder, g, X[best_i], best_i, center) if setup.validation is not None else None
    if validated:
        record.validation = validated[0]
    return record, validated


def _pin(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState, g: int, best_x: np.ndarray,
         record: GenerationRecord, eligible: bool, validated) -> None:
    """The pinned result: the validation best (with validation), else the search's best."""
    best_i = record.best_candidate
    best = record.candidates[best_i]
    if validated:
        _pin_validated(setup, ev, store, state, g, *validated)
    elif eligible and (state.best is None or best.loss < state.best.loss):
        state.best = PinnedRecord(generation=g, candidate=best_i, loss=best.loss, flip=best.flip, clip=best.clip,
                                  distance=best.distance, params=best.params, x=[float(v) for v in best_x])
        _write_pinned(setup, ev, store, state)


def _history_entry(setup: RunSetup, ev: Evaluator, stats: dict, g: int, batch: Batch, losses: np.ndarray,
                   record: GenerationRecord, validated, t0: float) -> HistoryEntry:
    best_i = record.best_candidate
    best = record.candidates[best_i]
    sorted_l = np.sort(losses)
    lam, B = batch.images.shape[:2]
    v_renders = len(validated[0]) * setup.validation.batch if validated else 0
    return HistoryEntry(
        generation=g, best=float(losses[best_i]), median=float(np.median(sorted_l)), worst=float(sorted_l[-1]),
        sigma=stats["sigma"], axis_ratio=stats["axis_ratio"], eigenvalues=stats["eigenvalues"],
        flip=best.flip, clip=best.clip, best_candidate=best_i, best_params=best.params,
        validation={v.kind: v.loss for v in validated[0]} if validated else None,
        seconds=time.time() - t0, renders=int(lam * B) + v_renders, validation_renders=v_renders,
        unet_evals=int(batch.unet_evals),
        workers=None if ev.workers is None else _worker_seconds([batch] + ([validated[2]] if validated else [])))


def _worker_seconds(batches: list[Batch]) -> dict[str, float]:
    """Seconds each worker spent on a generation's batches (its time split), in worker order."""
    total: dict[str, float] = {}
    for b in batches:
        for name, s in b.seconds.items():
            total[name] = total.get(name, 0.0) + s
    return {name: round(total[name], 3) for name in sorted(total)}


def _validate(setup: RunSetup, ev: Evaluator, folder: Path, g: int, best_x: np.ndarray, best_i: int,
              center: np.ndarray | None) -> tuple[list[CandidateRecord], list[np.ndarray], Batch]:
    """Render the generation's best candidate (and the distribution's mean) on the validation
    seeds; their images go to ``folder/validation/``. Returns (records, their xs, the batch)."""
    kinds = [("best", best_i, best_x)] + ([("mean", None, center)] if center is not None else [])
    return _validated(setup, ev, folder, g, kinds)


def _validated(setup: RunSetup, ev: Evaluator, folder: Path, g: int, kinds: list) -> tuple:
    """Candidates ``kinds`` [(kind, index, x)] rendered on the validation seeds: (records, xs, batch)."""
    xs = [x for _, _, x in kinds]
    batch = ev.evaluate(np.stack(xs), setup.validation, f"generation {g} validation")
    losses = _finite(batch.loss)
    eligible = _eligible(setup, batch.distance, losses)
    records, previews = [], keeps_previews(setup.config)
    for k, (kind, index, _) in enumerate(kinds):
        names = [save_render(folder, validation_image(kind, b), img, previews)[0]
                 for b, img in enumerate(batch.images[k])]
        record = _candidate_record(batch, k, losses, [f"generations/{generation_dirname(g)}/{n}" for n in names])
        record.index, record.kind, record.eligible = index, kind, bool(eligible[k])
        records.append(record)
    return records, xs, batch


def _pinned_loss(state: RunState) -> float:
    return math.inf if state.best is None or state.best.loss is None else state.best.loss


def file_exact(setup: RunSetup, params: dict[str, list[float]]) -> bool:
    """Whether a candidate with decoded ``params`` is all in its token vectors: every block a
    textual-inversion file cannot carry (``guidance.blocks.FILE_BLOCKS``) at its default."""
    defaults = {b.name: b.default for b in setup.space.blocks}
    return "token_vectors" in params and all(
        abs(v - defaults[name]) <= 1e-9 for name, values in params.items() if name not in FILE_BLOCKS for v in values)


def _pin_validated(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState, g: int,
                   records: list[CandidateRecord], xs: list[np.ndarray], batch: Batch) -> None:
    """Pin the lowest validation loss among this generation's validated candidates if it
    beats the pinned result so far (within ``--max-distance`` with the size limiter), and keep
    the lowest all-in-vectors one as the run's textual-inversion file if it beats the file so
    far and the plain prompt."""
    changed = False
    eligible = [k for k, r in enumerate(records) if r.eligible]
    if eligible:
        k = min(eligible, key=lambda j: records[j].loss)
        r = records[k]
        if r.loss < _pinned_loss(state):
            state.best = PinnedRecord(generation=g, candidate=r.index if r.kind == "best" else r.kind, kind=r.kind,
                                      loss=r.loss, flip=r.flip, clip=r.clip, distance=r.distance, params=r.params,
                                      images=r.images, image_losses=r.image_losses, validation=True,
                                      x=[float(v) for v in xs[k]])
            changed = True
    exact = [k for k in eligible if file_exact(setup, records[k].params)]
    if exact:
        k = min(exact, key=lambda j: records[j].loss)
        r, plain = records[k], state.plain_validation
        if r.loss < (math.inf if state.file is None else state.file.loss) and (plain is None or r.loss < plain.loss):
            state.file = FileRecord(generation=g, kind=r.kind, loss=r.loss, x=[float(v) for v in xs[k]], flip=r.flip,
                                    clip=r.clip, params=r.params, images=r.images, image_losses=r.image_losses)
            changed = True
    if changed:
        _write_pinned(setup, ev, store, state)


def _validate_plain(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState) -> None:
    """The plain prompt on the validation seeds: its record (images under ``validation/``),
    and the pinned result until a candidate beats it."""
    batch = ev.evaluate_plain(setup.validation)
    previews = keeps_previews(setup.config)
    names = [save_render(store.root, validation_image("plain", b), img, previews)[0]
             for b, img in enumerate(batch.images[0])]
    plain = PlainValidation(
        loss=float(batch.loss[0]), flip=None if batch.flip is None else _num(batch.flip[0]),
        clip=None if batch.clip is None else _num(batch.clip[0]), image_losses=[_num(x) for x in batch.per_image[0]],
        images=names, seed=setup.validation.seed, renders=int(batch.images.shape[1]))
    state.plain_validation = plain
    if state.best is None:
        state.best = PinnedRecord(generation=None, candidate="plain", kind="plain", loss=plain.loss, flip=plain.flip,
                                  clip=plain.clip, distance=0.0, params={}, images=names,
                                  image_losses=plain.image_losses, validation=True)
        _write_pinned(setup, ev, store, state)


def _eligible(setup: RunSetup, distance: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Candidates that may become the pinned result: all of them, or with the size limiter
    (``--max-distance``) those within the distance. A generation with none eligible still
    reports its lowest loss but pins nothing."""
    limit = setup.config.optim.max_distance
    if limit is None:
        return np.ones(len(losses), dtype=bool)
    return np.asarray(distance, dtype=np.float64) <= limit


def _error_maps(setup: RunSetup, images: np.ndarray, folder: Path) -> list[str]:
    """The best candidate's ꟻLIP error maps (from its uint8 images) as magma PNGs; none in self mode."""
    maps = setup.error_maps(images)
    if maps is None:
        return []
    cmap, previews = matplotlib.colormaps["magma"], keeps_previews(setup.config)
    return [save_render(folder, errmap_image(b), cmap(m)[..., :3].transpose(2, 0, 1), previews)[0]
            for b, m in enumerate(maps)]


def _write_pinned(setup: RunSetup, ev: Evaluator, store: RunStore, state: RunState) -> None:
    """The run's pinned result and textual-inversion file: their conditionings, built by the
    evaluator, in ``pinned.safetensors``."""
    best, file = state.best, state.file
    x = best.x if best.x is not None else (setup.space.encode(best.params) if best.params else None)
    pinned = ev.pinned(None if x is None else np.asarray(x))
    plain = state.plain_validation
    save_pinned(store.root / PINNED, setup.config, setup.info, pinned, best,
                None if file is None else (ev.pinned(np.asarray(file.x)), file), plain and plain.loss)


def _report(store: RunStore, g: int | None) -> None:
    update(store.root, g)


def _progress(bar, state: RunState, ev: Evaluator, quiet: bool) -> None:
    h, best = state.history[-1], state.best
    shown = {"pinned": "-" if best is None else f"{best.loss:.4f}", "file": "-" if state.file is None else
             f"{state.file.loss:.4f}"}
    if ev.workers is not None:
        shown["workers"] = "{}/{}".format(*ev.alive())
    bar.set_postfix(refresh=False, **shown)
    bar.update(1)
    if not quiet:
        val = "".join(f"  val {k} {x:.4f}" for k, x in (h.validation or {}).items())
        plain = state.plain_validation
        ref = f" (plain {plain.loss:.4f})" if plain else ""
        ref += f"  file {state.file.loss:.4f}" if state.file else ""
        bar.write(f"gen {h.generation:4d}  best {h.best:.4f}  median {h.median:.4f}{val}{ref}  "
                  f"sigma {h.sigma:.3g}  ({h.seconds:.1f}s)")
