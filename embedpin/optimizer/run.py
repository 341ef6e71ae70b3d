"""The pinning run: ask -> decode -> build -> render -> score -> tell -> commit -> report.

A generation is committed as a whole (images, generation.json, then state.json with the
optimizer's JSON state); a run killed at any moment resumes from its last committed
generation and ends where an uninterrupted run would have. Render seeds are the run's
seed in every generation (common random numbers: candidates are compared on the same
noise), so nothing but the optimizer state needs saving to continue exactly.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedpin.config import RunConfig
from embedpin.optimizer.session import Evaluation, Session
from embedpin.optimizer.store import RunStore, atomic_write_json, save_png


@dataclass
class RunResult:
    run_dir: Path
    best_loss: float
    first_best_loss: float
    generations: int
    renders: int
    interrupted: bool = False
    stop_reason: str = ""

    def summary(self) -> dict:
        return {"run_dir": str(self.run_dir), "best_loss": self.best_loss, "first_best_loss": self.first_best_loss,
                "generations": self.generations, "renders": self.renders, "interrupted": self.interrupted,
                "stop_reason": self.stop_reason}


def make_optimizer(session: Session):
    from embedpin.optimizer.cmaes import CMAES
    from embedpin.optimizer.mo import MOCMAES

    o = session.config.optim
    x0 = session.space.x0()
    if o.max_distance is not None:
        return MOCMAES(x0, o.sigma0, seed=o.seed, max_distance=o.max_distance,
                       **({"lambda_": o.population} if o.population else {}))
    return CMAES(x0, o.sigma0, seed=o.seed, lambda_=o.population)


def load_optimizer(state: dict):
    from embedpin.optimizer.cmaes import CMAES
    from embedpin.optimizer.mo import MOCMAES

    return (MOCMAES if "mocmaes" in str(state.get("format", "")) or "parents" in state else CMAES).from_state(state)


def total_generations(session: Session, opt) -> int:
    from embedpin.optimizer.cmaes import default_generations

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
    files = {f"targets/target_{i:02d}.png": t for i, t in enumerate(session.targets if session.targets is not None else [])}
    files.update({f"targets/guide_{i:02d}.png": g for i, g in enumerate(session.guide)})
    store = RunStore.create(config, files)
    state = store.read_state()
    state["space"] = session.space.to_dict()
    return _loop(session, store, make_optimizer(session), state, quiet)


def resume(run_dir: str | Path, quiet: bool = False) -> RunResult:
    """Continue a stopped run from its last committed generation."""
    store = RunStore.open(run_dir)
    state = store.read_state()
    session = Session.prepare(store.config())
    opt = load_optimizer(state["optimizer"]) if state["optimizer"] else make_optimizer(session)
    return _loop(session, store, opt, state, quiet)


def _loop(session: Session, store: RunStore, opt, state: dict, quiet: bool) -> RunResult:
    from tqdm import tqdm

    total = total_generations(session, opt)
    state["status"] = "running"
    store.write_state(state)
    _report(store, None)
    bar = tqdm(total=total, initial=state["generation"], disable=quiet, unit="gen", dynamic_ncols=True)
    reason, interrupted = "generations", False
    try:
        with _Interrupt() as stop:
            while state["generation"] < total:
                g = state["generation"]
                t0 = time.time()
                X = opt.ask()                                    # 1. ask: X [λ, n]
                ev = session.evaluate(X)                         # 2-5. decode, build, render, score
                losses = _finite(ev.score.loss)
                if hasattr(opt, "front"):                        # 6. tell
                    opt.tell(X, losses, ev.distance.double().cpu().numpy())
                else:
                    opt.tell(X, losses)
                _commit(session, store, state, opt, g, ev, losses, time.time() - t0)  # 7. commit
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
    state["status"] = "interrupted" if interrupted else "finished"
    state["stop_reason"] = reason
    store.write_state(state)
    _report(store, None)
    hist = state["history"]
    return RunResult(store.root, state["best"]["loss"] if state["best"] else math.nan,
                     hist[0]["best"] if hist else math.nan, state["generation"],
                     sum(h["renders"] for h in hist), interrupted, reason)


def _finite(loss: torch.Tensor) -> np.ndarray:
    out = loss.double().cpu().numpy()
    worst = np.nanmax(np.where(np.isfinite(out), out, np.nan)) if np.isfinite(out).any() else 1e9
    return np.where(np.isfinite(out), out, max(worst * 2, 1e9) if worst > 0 else 1e9)


def _converged(session: Session, opt, state: dict) -> bool:
    o = session.config.optim
    if hasattr(opt, "should_stop"):
        return bool(opt.should_stop(tol_fun=o.tol_fun, tol_x=o.tol_x))
    return False


def _candidate_record(ev: Evaluation, i: int, losses: np.ndarray, g_dir_images: list[str]) -> dict:
    s = ev.score
    return {"index": i, "loss": float(losses[i]),
            "flip": None if s.flip is None else _num(s.flip[i]), "clip": None if s.clip is None else _num(s.clip[i]),
            "distance": _num(ev.distance[i]),
            "params": {k: [float(x) for x in np.atleast_1d(v[i])] for k, v in ev.params.items()},
            "image_losses": [_num(x) for x in s.per_image[i]], "images": g_dir_images,
            "lineage": ev.render.lineage.tolist(), "seeds": ev.render.seeds.tolist()}


def _num(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def _commit(session: Session, store: RunStore, state: dict, opt, g: int, ev: Evaluation, losses: np.ndarray,
            seconds: float) -> None:
    """Write generation g as a whole, then the state that names it."""
    tmp = store.begin_generation(g)
    images = ev.render.images.float().cpu()
    lam, B = images.shape[:2]
    for i in range(lam):
        for b in range(B):
            save_png(tmp / "images" / f"c{i:02d}_i{b:02d}.png", images[i, b])
    eligible = _eligible(session, ev, losses)
    best_i = int(np.argmin(np.where(eligible, losses, np.inf))) if eligible.any() else int(np.argmin(losses))
    errmaps = _error_maps(session, ev, best_i, tmp)
    record = {"generation": g, "sigma": float(opt.sigma), "best_candidate": best_i, "errmaps": errmaps,
              "candidates": [_candidate_record(ev, i, losses, [f"images/c{i:02d}_i{b:02d}.png" for b in range(B)])
                             for i in range(lam)]}
    store.finish_generation(g, tmp, record)
    best = record["candidates"][best_i]
    if eligible[best_i] and (state["best"] is None or best["loss"] < state["best"]["loss"]):
        state["best"] = {"generation": g, "candidate": best_i, "loss": best["loss"], "distance": best["distance"],
                         "params": best["params"]}
        _write_pinned(session, store, ev, best_i, state["best"])
    sorted_l = np.sort(losses)
    state["history"].append({
        "generation": g, "best": float(losses[best_i]), "median": float(np.median(sorted_l)),
        "worst": float(sorted_l[-1]), "sigma": float(opt.sigma),
        "axis_ratio": float(getattr(opt, "axis_ratio", float("nan"))) if hasattr(opt, "axis_ratio") else None,
        "eigenvalues": [float(x) for x in getattr(opt, "eigenvalues", [])] if hasattr(opt, "eigenvalues") else [],
        "flip": best["flip"], "clip": best["clip"], "best_candidate": best_i, "best_params": best["params"],
        "seconds": seconds, "renders": int(lam * B), "unet_evals": int(ev.render.unet_evals)})
    if hasattr(opt, "front"):
        state["pareto"] = _pareto(opt)
    state["generation"] = g + 1
    state["optimizer"] = opt.state_dict()
    store.write_state(state)


def _eligible(session: Session, ev: Evaluation, losses: np.ndarray) -> np.ndarray:
    """Candidates that may become the pinned result: all of them, or with the size limiter
    (``--max-distance``) those within the distance. A generation with none eligible still
    reports its lowest loss but pins nothing."""
    limit = session.config.optim.max_distance
    if limit is None:
        return np.ones(len(losses), dtype=bool)
    return ev.distance.double().cpu().numpy() <= limit


def _pareto(opt) -> list[dict]:
    _, F = opt.front()
    return [{"loss": float(f[0]), "distance": float(f[1])} for f in F]


def _error_maps(session: Session, ev: Evaluation, best_i: int, folder: Path) -> list[str]:
    if session.targets is None or not hasattr(session.scorer, "error_maps"):
        return []
    import matplotlib

    maps = session.scorer.error_maps(ev.render.images[best_i]).float().clamp(0, 1).cpu().numpy()
    cmap = matplotlib.colormaps["magma"]
    (folder / "errmaps").mkdir(exist_ok=True)
    names = []
    for b, m in enumerate(maps):
        save_png(folder / "errmaps" / f"i{b:02d}.png", cmap(m)[..., :3].transpose(2, 0, 1))
        names.append(f"errmaps/i{b:02d}.png")
    return names


def _write_pinned(session: Session, store: RunStore, ev: Evaluation, i: int, best: dict) -> None:
    from embedpin.export import save_pinned

    save_pinned(store.root / "pinned.safetensors", session, ev.cond, i, best)


def _report(store: RunStore, g: int | None) -> None:
    from embedpin.reports.builder import update

    update(store.root, g)


def _progress(bar, state: dict, quiet: bool) -> None:
    h = state["history"][-1]
    bar.set_postfix(best=f"{state['best']['loss']:.4f}", refresh=False)
    bar.update(1)
    if not quiet:
        bar.write(f"gen {h['generation']:4d}  best {h['best']:.4f}  median {h['median']:.4f}  "
                  f"sigma {h['sigma']:.3g}  ({h['seconds']:.1f}s)")
