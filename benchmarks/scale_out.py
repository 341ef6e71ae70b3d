"""Scale-out on Ray workers against the in-process run, side by side in one run, on the micro model.

The same recipe (the defaults: λ = 4 + 3 ln n candidates x B = 8 images, 12 steps, 16 validation
seeds; ``--generations`` G) is run in this process, on 1 Ray worker and on 2 Ray workers (a local
CPU cluster this script starts; 1 worker gets all CPUs, 2 workers one each), then once more on 2
workers with one worker's process SIGKILLed once it has started its chunk of the last generation.
Printed:

- generation wall time (median over generations after the first) and its ratio to in-process;
- throughput: images rendered per second (search and validation);
- overhead per generation of the Ray path: for every call to the workers, the driver's wall time
  minus the slowest worker's own rendering and scoring time (serialization, scheduling, transfer;
  the pinned-conditioning calls count whole), summed over a generation, as % of the generation;
- bytes moved per generation: pickled calls sent, arrays returned (and one returned batch's
  pickled size over its arrays' bytes);
- the largest difference of any generation's best / median / validation loss from in-process;
- recovery from the killed worker: the killed generation's extra wall time over the clean 2-worker
  median, and the seconds until the restarted worker was back (its model reloaded).

On 2 cores the workers share the CPUs the in-process run uses, so expect little speed-up; the
figures that carry over to GPUs are the overhead, the bytes and the recovery.

    python benchmarks/scale_out.py [--generations 3] [--out /tmp/scale_out_runs]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # benchmark's own local cluster: no token file
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAR = str(Path(__file__).resolve().parents[1] / "examples" / "star.png")
PROMPT = "a large star in the center"


class Timed:
    """An evaluator wrapper that times every call: (generation, driver seconds, slowest worker's
    seconds, bytes sent, bytes returned), and timestamps its notes."""

    def __init__(self, inner):
        self.inner, self.calls, self.notes, self.generation = inner, [], [], -1
        self._notify = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def notify(self):
        return self._notify

    @notify.setter
    def notify(self, fn):
        def logged(message):
            self.notes.append((time.monotonic(), message))
            fn(message)
        self._notify = logged
        self.inner.notify = logged

    def _timed(self, fn, *args):
        traffic = dict(getattr(self.inner, "traffic", {"sent": 0, "received": 0}))
        t = time.perf_counter()
        out = fn(*args)
        wall = time.perf_counter() - t
        work = max(out.seconds.values()) if hasattr(out, "seconds") else 0.0
        now = getattr(self.inner, "traffic", {"sent": 0, "received": 0})
        self.calls.append((self.generation, wall, work, now["sent"] - traffic["sent"],
                           now["received"] - traffic["received"], out))
        return out

    def evaluate(self, X, plan, label=""):
        if label.startswith("generation ") and "validation" not in label:
            self.generation = int(label.split()[1])
        return self._timed(self.inner.evaluate, X, plan, label)

    def evaluate_plain(self, plan):
        return self._timed(self.inner.evaluate_plain, plan)

    def pinned(self, x):
        return self._timed(self.inner.pinned, x)


def config_for(args, out: Path):
    from embedpin.api import run_config

    return run_config(target=STAR, prompt=PROMPT, generations=args.generations, out=str(out))


def one_run(args, name: str, workers: int, kill_at: int | None = None) -> dict:
    """One run; returns its history, calls and notes (and the kill's time)."""
    from embedpin.config import ScaleConfig
    from embedpin.optimizer.evaluate import LocalEvaluator
    from embedpin.optimizer.ray_workers import RayEvaluator
    from embedpin.optimizer.session import Session
    from embedpin.runner import run

    config = config_for(args, Path(args.out) / name)
    t = time.perf_counter()
    inner = RayEvaluator(config, ScaleConfig(workers=workers)) if workers else LocalEvaluator(Session.prepare(config))
    start = time.perf_counter() - t
    ev, killed = Timed(inner), {}
    thread = None
    if kill_at is not None:
        thread = threading.Thread(target=kill_when_busy, args=(inner, f"generation {kill_at} [", killed), daemon=True)
        thread.start()
    try:
        t = time.perf_counter()
        result = run(config, quiet=True, evaluator=ev)
        total = time.perf_counter() - t
    finally:
        if thread is not None:
            thread.join(timeout=600)
        inner.close()
    state = json.loads((result.run_dir / "state.json").read_text())
    print(f"{name}: start-up {start:.1f}s, run {total:.1f}s, generations "
          + ", ".join(f"{h['seconds']:.1f}s" for h in state["history"]), flush=True)
    return dict(name=name, start=start, total=total, history=state["history"], calls=ev.calls, notes=ev.notes,
                killed=killed, renders=result.renders, workers=result.workers)


def kill_when_busy(ev, prefix: str, killed: dict) -> None:
    """SIGKILL worker w1's process once it says it has started a chunk labelled ``prefix…``; then
    time how long until Ray has it back (restarted, its model reloaded)."""
    import ray

    actor = ev.slots[1].actor
    while True:
        status = ray.get(actor.status.remote())
        if (status["busy"] or "").startswith(prefix):
            os.kill(status["pid"], signal.SIGKILL)
            killed["at"] = time.monotonic()
            break
        time.sleep(0.01)
    while "back" not in killed:
        try:
            ray.get(actor.ready.remote(), timeout=600)
            killed["back"] = time.monotonic()
        except ray.exceptions.RayActorError:
            time.sleep(0.1)


def per_generation(run: dict) -> dict[int, dict]:
    """Per generation: driver overhead seconds and bytes sent / returned."""
    out: dict[int, dict] = {}
    for g, wall, work, sent, received, _ in run["calls"]:
        if g < 0:
            continue
        row = out.setdefault(g, {"overhead": 0.0, "sent": 0, "received": 0})
        row["overhead"] += wall - work
        row["sent"] += sent
        row["received"] += received
    return out


def steady(history: list[dict]) -> float:
    """Median generation seconds after the first (the first carries one-time warm-up)."""
    return float(np.median([h["seconds"] for h in history[1:]] or [history[0]["seconds"]]))


def loss_gap(a: list[dict], b: list[dict]) -> float:
    gaps = [abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("best", "median")]
    gaps += [abs(x["validation"][k] - y["validation"][k]) for x, y in zip(a, b) for k in (x["validation"] or {})]
    return max(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="scale_out_")
    import ray

    local = one_run(args, "in-process", 0)
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    cluster = time.perf_counter() - t
    print(f"ray.init: {cluster:.1f}s", flush=True)
    runs = [one_run(args, "1-worker", 1), one_run(args, "2-workers", 2)]
    killed = one_run(args, "2-workers-killed", 2, kill_at=args.generations - 1)
    ray.shutdown()

    base = steady(local["history"])
    images = sum(h["renders"] for h in local["history"][1:]) / max(1, len(local["history"]) - 1)
    headline = {}
    for run in [local, *runs]:
        tag = run["name"].replace("-", "_")
        gen = steady(run["history"])
        rows = per_generation(run)
        later = [rows[g] for g in sorted(rows) if g > 0] or list(rows.values())
        overhead = float(np.median([r["overhead"] for r in later]))
        print(f"{run['name']}: generation {gen:.2f}s ({gen / base:.3f}x in-process), {images / gen:.2f} images/s, "
              f"overhead {overhead * 1000:.0f} ms/generation ({100 * overhead / gen:.2f}%), "
              f"sent {np.median([r['sent'] for r in later]) / 1e3:.1f} kB, "
              f"returned {np.median([r['received'] for r in later]) / 1e6:.2f} MB per generation; "
              f"loss gap {loss_gap(run['history'], local['history']):.2e}")
        headline[f"generation_ratio_{tag}"] = f"{gen / base:.3f}"
        headline[f"images_per_s_{tag}"] = f"{images / gen:.2f}"
        if run is not local:
            headline[f"overhead_pct_{tag}"] = f"{100 * overhead / gen:.2f}"
            headline[f"bytes_sent_per_generation_{tag}"] = f"{np.median([r['sent'] for r in later]):.0f}"
            headline[f"bytes_returned_per_generation_{tag}"] = f"{np.median([r['received'] for r in later]):.0f}"
            headline[f"loss_gap_{tag}"] = f"{loss_gap(run['history'], local['history']):.2e}"
    batch = next(c[-1] for c in runs[1]["calls"] if hasattr(c[-1], "nbytes") and len(c[-1]) > 1)
    pickled = len(pickle.dumps(batch, protocol=5))
    print(f"one returned chunk ({len(batch)} candidates): {batch.nbytes} bytes of arrays, pickled {pickled} "
          f"({pickled / batch.nbytes:.3f}x)")

    clean = steady(runs[1]["history"])
    g = args.generations - 1
    extra = killed["history"][g]["seconds"] - clean
    reload = killed["killed"]["back"] - killed["killed"]["at"] if "back" in killed["killed"] else float("nan")
    print(f"killed worker in generation {g}: that generation took {killed['history'][g]['seconds']:.2f}s against "
          f"{clean:.2f}s clean (+{extra:.2f}s); the worker was back {reload:.1f}s after the kill; "
          f"workers {killed['workers']}; loss gap {loss_gap(killed['history'], local['history'][:len(killed['history'])]):.2e}")
    for note in killed["notes"]:
        print("  note:", note[1])
    headline.update({"ray_init_s": f"{cluster:.2f}", "worker_start_s_2_workers": f"{runs[1]['start']:.2f}",
                     "kill_extra_generation_s": f"{extra:.2f}", "kill_extra_generation_ratio": f"{extra / clean:.3f}",
                     "killed_worker_back_after_s": f"{reload:.2f}",
                     "loss_gap_killed": f"{loss_gap(killed['history'], local['history'][:len(killed['history'])]):.2e}",
                     "pickled_over_array_bytes": f"{pickled / batch.nbytes:.4f}"})
    for name, value in headline.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
