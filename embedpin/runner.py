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
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from embedpin.config import RunConfig
from embedpin.optimizer.cmaes import CMAES, default_generations
from embedpin.optimizer.mo import MOCMAES
from embedpin.optimizer.session import Evaluation, Session
from embedpin.pinned import save_pinned
from embedpin.reports.builder import update
from embedpin.store import (
    PINNED,
    CandidateRecord,
    GenerationRecord,
    HistoryEntry,
    PinnedRecord,
    PlainValidation,
    RunState,
    RunStore,
    candidate_image,
    errmap_image,
    generation_dirname,
    keeps_previews,
    save_render,
    target_file,
    validation_image,
)


@dataclass
class RunResult:
    """best_loss: the pinned result's loss (its validation loss when validation is on);
    validation_loss / plain_validation_loss: the pinned result's and the plain prompt's
    loss on the validation seeds (None without validation); renders: images rendered,
    validation included."""

    run_dir: Path
    best_loss: float
    first_best_loss: float
    generations: int
    renders: int
    interrupted: bool = False
    stop_reason: str = ""
    validation_loss: float | None = None
    plain_validation_loss: float | None = None
    pinned: dict | None = field(default=None, repr=False)  # the pinned tensors (filled in by embedpin.api)

    def describe(self) -> str:
        """What a person reads at the end: where the run is and how the result did."""
        if self.validation_loss is not None and self.plain_validation_loss:
            how = (f"validation loss {self.validation_loss:.4f} against the plain prompt's "
                   f"{self.plain_validation_loss:.4f} ({self.validation_loss / self.plain_validation_loss:.2f}x) "
                   f"on seeds the search never used")
        else:
            how = f"loss {self.best_loss:.4f} on the search's own seeds"
        return f"run folder: {self.run_dir}\npinned result: {how}\nreport: {self.run_dir / 'index.html'}"

    def summary(self) -> dict:
        return {"run_dir": str(self.run_dir), "best_loss": self.best_loss, "first_best_loss": self.first_best_loss,
                "generations": self.generations, "renders": self.renders, "interrupted": self.interrupted,
                "stop_reason": self.stop_reason, "validation_loss": self.validation_loss,
                "plain_validation_loss": self.plain_validation_loss}


def make_optimizer(session: Session):
    optim = session.config.optim
    x0 = session.space.x0()
    if optim.max_distance is not None:
        return MOCMAES(x0, optim.sigma0, seed=optim.seed, max_distance=optim.max_distance,
                       **({"lambda_": optim.population} if optim.population else {}))
    return CMAES(x0, optim.sigma0, seed=optim.seed, lambda_=optim.population)


def load_optimizer(state: dict):
    return (MOCMAES if "mocmaes" in str(state.get("format", "")) or "parents" in state else CMAES).from_state(state)


def total_generations(session: Session, opt) -> int:
    return session.config.optim.generations or default_generations(opt.n)


class _Interrupt:
    """First Ctrl-C: stop after the current generation's writes. Second: stop now."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this generation (Ctrl-C again to stop now; the run stays resumable)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def run(config: RunConfig, quiet: bool = False) -> RunResult:
    """Start a new run: validate and load everything, then create the run folder and loop."""
    session = Session.prepare(config)
    files = {target_file(i): t for i, t in enumerate(session.targets if session.targets is not None else [])}
    files.update({target_file(i, "guide"): g for i, g in enumerate(session.guide)})
    store = RunStore.create(session.config, files)  # the config with the model's defaults filled in
    state = store.read_state()
    state.space = session.space.to_dict()
    state.notes = session.notes or None
    return _loop(session, store, make_optimizer(session), state, quiet)


def resume(run_dir: str | Path, quiet: bool = False) -> RunResult:
    """Continue a stopped run from its last committed generation."""
    store = RunStore.open(run_dir)
    state = store.read_state()
    session = Session.prepare(store.config())
    opt = load_optimizer(state.optimizer) if state.optimizer else make_optimizer(session)
    return _loop(session, store, opt, state, quiet)


def _loop(session: Session, store: RunStore, opt, state: RunState, quiet: bool) -> RunResult:
    total = total_generations(session, opt)
    for note in session.notes if not quiet else []:
        print(f"note: {note}", file=sys.stderr)
    state.status = "running"
    store.write_state(state)
    _report(store, None)
    if session.validation is not None and state.plain_validation is None:
        _validate_plain(session, store, state)
        store.write_state(state)
    bar = tqdm(total=total, initial=state.generation, disable=quiet, unit="gen", dynamic_ncols=True)
    reason, interrupted = "generations", False
    try:
        with _Interrupt() as stop:
            while state.generation < total:
                g = state.generation
                t0 = time.time()
                X = opt.ask()                                    # 1. ask: X [λ, n]
                center = opt.stats()["mean"] if g in (0, total - 1) else None  # validated: the start and the end
                ev = session.evaluate(X, g)                      # 2-5. decode, build, render, score
                losses = _finite(ev.score.loss)
                opt.tell(X, losses, ev.distance.double().cpu().numpy())  # 6. tell
                _commit(session, store, state, opt, g, ev, losses, X, center, t0)  # 7-8. validate, commit
                _report(store, g)                                # 8. report
                _progress(bar, state, quiet)
                if stop.requested:
                    reason, interrupted = "interrupted", True
                    break
                if _converged(session, opt, state):
                    reason = "converged"
                    break
    except KeyboardInterrupt:
        reason, interrupted = "interrupted", True
    finally:
        bar.close()
    state = store.read_state()
    state.status = "interrupted" if interrupted else "finished"
    state.stop_reason = reason
    store.write_state(state)
    _report(store, None)
    hist, plain = state.history, state.plain_validation
    best = state.best.loss if state.best else math.nan
    validated = plain is not None
    return RunResult(store.root, best, hist[0].best if hist else math.nan, state.generation,
                     sum(h.renders for h in hist) + (plain.renders if validated else 0), interrupted, reason,
                     best if validated and state.best else None, plain.loss if validated else None)


def _finite(loss: torch.Tensor) -> np.ndarray:
    out = loss.double().cpu().numpy()
    worst = np.nanmax(np.where(np.isfinite(out), out, np.nan)) if np.isfinite(out).any() else 1e9
    return np.where(np.isfinite(out), out, max(worst * 2, 1e9) if worst > 0 else 1e9)


def _converged(session: Session, opt, state: RunState) -> bool:
    optim = session.config.optim
    return bool(opt.should_stop(tol_fun=optim.tol_fun, tol_x=optim.tol_x))


def _candidate_record(ev: Evaluation, i: int, losses: np.ndarray, images: list[str]) -> CandidateRecord:
    s = ev.score
    return CandidateRecord(
        index=i, loss=float(losses[i]), flip=None if s.flip is None else _num(s.flip[i]),
        clip=None if s.clip is None else _num(s.clip[i]), distance=_num(ev.distance[i]),
        params={k: [float(x) for x in np.atleast_1d(v[i])] for k, v in ev.params.items()},
        image_losses=[_num(x) for x in s.per_image[i]], images=images,
        lineage=ev.render.lineage.tolist(), seeds=ev.render.seeds.tolist())


def _num(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _commit(session: Session, store: RunStore, state: RunState, opt, g: int, ev: Evaluation, losses: np.ndarray,
            X: np.ndarray, center: np.ndarray | None, t0: float) -> None:
    """Generation g in four steps: build its folder and record (validation included), store
    it as a whole, pin the result it may improve, then write the state that names it."""
    tmp = store.begin_generation(g)
    eligible = _eligible(session, ev.distance, losses)
    best_i = int(np.argmin(np.where(eligible, losses, np.inf))) if eligible.any() else int(np.argmin(losses))
    record, validated = _generation_record(session, tmp, opt, g, ev, losses, X, best_i, center)
    store.finish_generation(g, tmp, record)
    _pin(session, store, state, g, ev, record, eligible[best_i], validated)
    stats = opt.stats()
    state.history.append(_history_entry(session, stats, g, ev, losses, record, validated, t0))
    if stats["front"] is not None:
        state.pareto = stats["front"]
    state.generation = g + 1
    state.optimizer = opt.to_state()
    store.write_state(state)


def _generation_record(session: Session, folder: Path, opt, g: int, ev: Evaluation, losses: np.ndarray,
                       X: np.ndarray, best_i: int, center: np.ndarray | None):
    """Write the generation's images, error maps and validation renders into ``folder``;
    returns (its record, the validation (records, evaluation) or None)."""
    images = ev.render.images.float().cpu()
    lam, B = images.shape[:2]
    previews = keeps_previews(session.config)
    candidates = []
    for i in range(lam):
        saved = [save_render(folder, candidate_image(i, b), images[i, b], previews, full=i == best_i) for b in range(B)]
        record = _candidate_record(ev, i, losses, [shown for shown, _ in saved])
        record.full = [full for _, full in saved] if saved[0][1] else None
        candidates.append(record)
    record = GenerationRecord(
        generation=g, sigma=float(opt.sigma), best_candidate=best_i, errmaps=_error_maps(session, ev, best_i, folder),
        seed=session.search_plan(g).seed, candidates=candidates)
    validated = _validate(session, folder, g, X[best_i], best_i, center) if session.validation is not None else None
    if validated:
        record.validation = validated[0]
    return record, validated


def _pin(session: Session, store: RunStore, state: RunState, g: int, ev: Evaluation, record: GenerationRecord,
         eligible: bool, validated) -> None:
    """The pinned result: the validation best (with validation), else the search's best."""
    best_i = record.best_candidate
    best = record.candidates[best_i]
    if validated:
        _pin_validated(session, store, state, g, *validated)
    elif eligible and (state.best is None or best.loss < state.best.loss):
        state.best = PinnedRecord(generation=g, candidate=best_i, loss=best.loss, flip=best.flip, clip=best.clip,
                                  distance=best.distance, params=best.params)
        _write_pinned(session, store, ev.cond, best_i, state.best)


def _history_entry(session: Session, stats: dict, g: int, ev: Evaluation, losses: np.ndarray,
                   record: GenerationRecord, validated, t0: float) -> HistoryEntry:
    best_i = record.best_candidate
    best = record.candidates[best_i]
    sorted_l = np.sort(losses)
    lam, B = ev.render.images.shape[:2]
    v_renders = len(validated[0]) * session.validation.batch if validated else 0
    return HistoryEntry(
        generation=g, best=float(losses[best_i]), median=float(np.median(sorted_l)), worst=float(sorted_l[-1]),
        sigma=stats["sigma"], axis_ratio=stats["axis_ratio"], eigenvalues=stats["eigenvalues"],
        flip=best.flip, clip=best.clip, best_candidate=best_i, best_params=best.params,
        validation={v.kind: v.loss for v in validated[0]} if validated else None,
        seconds=time.time() - t0, renders=int(lam * B) + v_renders, validation_renders=v_renders,
        unet_evals=int(ev.render.unet_evals))


def _validate(session: Session, folder: Path, g: int, best_x: np.ndarray, best_i: int,
              center: np.ndarray | None) -> tuple[list[CandidateRecord], Evaluation]:
    """Render the generation's best candidate (and the distribution's mean) on the validation
    seeds; their images go to ``folder/validation/``. Returns (records, the evaluation)."""
    kinds = [("best", best_i, best_x)] + ([("mean", None, center)] if center is not None else [])
    ev = session.validate(np.stack([x for _, _, x in kinds]))
    losses = _finite(ev.score.loss)
    eligible = _eligible(session, ev.distance, losses)
    records, previews = [], keeps_previews(session.config)
    for k, (kind, index, _) in enumerate(kinds):
        names = [save_render(folder, validation_image(kind, b), img, previews)[0]
                 for b, img in enumerate(ev.render.images[k].float().cpu())]
        record = _candidate_record(ev, k, losses, [f"generations/{generation_dirname(g)}/{n}" for n in names])
        record.index, record.kind, record.eligible = index, kind, bool(eligible[k])
        records.append(record)
    return records, ev


def _pin_validated(session: Session, store: RunStore, state: RunState, g: int, records: list[CandidateRecord],
                   ev: Evaluation) -> None:
    """Pin the lowest validation loss among this generation's validated candidates if it
    beats the pinned result so far (within ``--max-distance`` with the size limiter)."""
    if not any(r.eligible for r in records):
        return
    k = min(range(len(records)), key=lambda j: records[j].loss if records[j].eligible else math.inf)
    r = records[k]
    if state.best is None or r.loss < state.best.loss:
        state.best = PinnedRecord(generation=g, candidate=r.index if r.kind == "best" else "mean", kind=r.kind,
                                  loss=r.loss, flip=r.flip, clip=r.clip, distance=r.distance, params=r.params,
                                  images=r.images, image_losses=r.image_losses, validation=True)
        _write_pinned(session, store, ev.cond, k, state.best)


def _validate_plain(session: Session, store: RunStore, state: RunState) -> None:
    """The plain prompt on the validation seeds: its record (images under ``validation/``),
    and the pinned result until a candidate beats it."""
    cond, out, score = session.validate_plain()
    previews = keeps_previews(session.config)
    names = [save_render(store.root, validation_image("plain", b), img, previews)[0]
             for b, img in enumerate(out.images[0].float().cpu())]
    plain = PlainValidation(
        loss=float(score.loss[0]), flip=None if score.flip is None else _num(score.flip[0]),
        clip=None if score.clip is None else _num(score.clip[0]), image_losses=[_num(x) for x in score.per_image[0]],
        images=names, seed=session.validation.seed, renders=int(out.images.shape[1]))
    state.plain_validation = plain
    if state.best is None:
        state.best = PinnedRecord(generation=None, candidate="plain", kind="plain", loss=plain.loss, flip=plain.flip,
                                  clip=plain.clip, distance=0.0, params={}, images=names,
                                  image_losses=plain.image_losses, validation=True)
        _write_pinned(session, store, cond, 0, state.best)


def _eligible(session: Session, distance: torch.Tensor, losses: np.ndarray) -> np.ndarray:
    """Candidates that may become the pinned result: all of them, or with the size limiter
    (``--max-distance``) those within the distance. A generation with none eligible still
    reports its lowest loss but pins nothing."""
    limit = session.config.optim.max_distance
    if limit is None:
        return np.ones(len(losses), dtype=bool)
    return distance.double().cpu().numpy() <= limit


def _error_maps(session: Session, ev: Evaluation, best_i: int, folder: Path) -> list[str]:
    if session.targets is None:
        return []

    maps = session.scorer.error_maps(ev.render.images[best_i]).float().clamp(0, 1).cpu().numpy()
    cmap, previews = matplotlib.colormaps["magma"], keeps_previews(session.config)
    return [save_render(folder, errmap_image(b), cmap(m)[..., :3].transpose(2, 0, 1), previews)[0]
            for b, m in enumerate(maps)]


def _write_pinned(session: Session, store: RunStore, cond, i: int, best: PinnedRecord) -> None:
    save_pinned(store.root / PINNED, session.config, session.components, cond, i, best)


def _report(store: RunStore, g: int | None) -> None:
    update(store.root, g)


def _progress(bar, state: RunState, quiet: bool) -> None:
    h, best = state.history[-1], state.best
    bar.set_postfix(pinned="-" if best is None else f"{best.loss:.4f}", refresh=False)
    bar.update(1)
    if not quiet:
        val = "".join(f"  val {k} {x:.4f}" for k, x in (h.validation or {}).items())
        plain = state.plain_validation
        ref = f" (plain {plain.loss:.4f})" if plain else ""
        bar.write(f"gen {h.generation:4d}  best {h.best:.4f}  median {h.median:.4f}{val}{ref}  "
                  f"sigma {h.sigma:.3g}  ({h.seconds:.1f}s)")
