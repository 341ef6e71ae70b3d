"""Scale-out on Ray workers against the in-process run, side by side in one run, on the micro model.

The same recipe (the defaults: λ = 4 + 3 ln n candidates x B = 8 images, 12 steps, 16 validation
seeds; ``--generations`` G) is run in this process, on 1 Ray worker and on 2 Ray workers (each on a
local cluster of its own, started as ``--workers N`` starts it: 1 worker gets all CPUs, 2 workers
one each), then twice more on 2 workers: with worker w1's process SIGKILLed once it has started its
chunk of the middle generation, and with the local node lost then (its ``ray::DashboardAgent``
SIGKILLed: the raylet fate-shares with it, taking both workers). Printed:

- generation wall time (median over generations after the first) and its ratio to in-process;
- throughput: images rendered per second (search and validation);
- overhead per generation of the Ray path: for every call to the workers, the driver's wall time
  minus the slowest worker's own rendering and scoring time (serialization, scheduling, transfer;
  the pinned-conditioning calls count whole), summed over a generation, as % of the generation;
- bytes moved per generation: pickled calls sent, arrays returned (and one returned batch's
  pickled size over its arrays' bytes);
- the largest difference of any generation's best / median / validation loss from in-process;
- recovery, for the killed worker and for the lost node: the generation's extra wall time over the
  clean 2-worker median, and the seconds from the kill until the workers were back (the run's
  "is back" notes: restarted, the model reloaded; for the node, the local cluster started again).

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
import subprocess
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


def one_run(args, name: str, workers: int, kill: str | None = None) -> dict:
    """One run; returns its history, calls and notes (with ``kill``, "worker" or "node": the kill's
    time, in the last generation)."""
    from embedpin.config import ScaleConfig
    from embedpin.evaluation.evaluate import LocalEvaluator
    from embedpin.evaluation.ray_workers import RayEvaluator
    from embedpin.evaluation.session import Session
    from embedpin.runner import run

    config = config_for(args, Path(args.out) / name)
    t = time.perf_counter()
    inner = RayEvaluator(config, ScaleConfig(workers=workers)) if workers else LocalEvaluator(Session.prepare(config))
    start = time.perf_counter() - t
    ev, killed = Timed(inner), {}
    thread = None
    if kill is not None:
        victim = kill_worker if kill == "worker" else kill_node
        thread = threading.Thread(target=when_busy, args=(inner, f"generation {killed_in(args)} [", victim, killed),
                                  daemon=True)
        thread.start()
    try:
        t = time.perf_counter()
        result = run(config, evaluator=ev)
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


def killed_in(args) -> int:
    """The generation the kills happen in: the middle one, so the run goes on after the workers are back."""
    return args.generations // 2


def when_busy(ev, prefix: str, victim, killed: dict) -> None:
    """Once worker w1 says it has started a chunk labelled ``prefix…``, SIGKILL ``victim(its status)``."""
    import ray

    actor = ev.slots[1].actor
    while True:
        status = ray.get(actor.status.remote())
        if (status["busy"] or "").startswith(prefix):
            os.kill(victim(status), signal.SIGKILL)
            killed["at"] = time.monotonic()
            return
        time.sleep(0.01)


def kill_worker(status: dict) -> int:
    return status["pid"]


def kill_node(status: dict) -> int:
    """The local cluster's dashboard agent: a child of the raylet this process started."""
    rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True,
                                                            text=True).stdout.splitlines()[1:]]
    raylets = {int(pid) for pid, ppid, cmd in rows if int(ppid) == os.getpid() and "raylet" in cmd.split()[0]}
    return next(int(pid) for pid, ppid, cmd in rows if int(ppid) in raylets and cmd.startswith("ray::DashboardAgent"))


def recovery(killed: dict, clean: float, g: int, local: dict) -> dict:
    """The killed run's generation g against the clean median: extra seconds, ratio, seconds until
    the last worker was back, loss gap."""
    gen = killed["history"][g]["seconds"]
    backs = [t for t, message in killed["notes"] if "is back" in message]
    return {"generation_s": gen, "extra_s": gen - clean, "extra_ratio": (gen - clean) / clean,
            "back_after_s": max(backs) - killed["killed"]["at"] if backs else float("nan"),
            "loss_gap": loss_gap(killed["history"], local["history"][:len(killed["history"])])}


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
    local = one_run(args, "in-process", 0)
    runs = [one_run(args, "1-worker", 1), one_run(args, "2-workers", 2)]
    killed = {kill: one_run(args, f"2-workers-{kill}-killed", 2, kill=kill) for kill in ("worker", "node")}

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

    clean, g = steady(runs[1]["history"]), killed_in(args)
    for kill, run in killed.items():
        r = recovery(run, clean, g, local)
        print(f"{kill} killed in generation {g}: that generation took {r['generation_s']:.2f}s against {clean:.2f}s "
              f"clean (+{r['extra_s']:.2f}s); the workers were back {r['back_after_s']:.1f}s after the kill; "
              f"workers {run['workers']}; loss gap {r['loss_gap']:.2e}")
        for note in run["notes"]:
            print("  note:", note[1])
        headline.update({f"{kill}_kill_extra_generation_s": f"{r['extra_s']:.2f}",
                         f"{kill}_kill_extra_generation_ratio": f"{r['extra_ratio']:.3f}",
                         f"{kill}_kill_back_after_s": f"{r['back_after_s']:.2f}",
                         f"loss_gap_{kill}_killed": f"{r['loss_gap']:.2e}"})
    headline.update({"worker_start_s_2_workers": f"{runs[1]['start']:.2f}",
                     "pickled_over_array_bytes": f"{pickled / batch.nbytes:.4f}"})
    for name, value in headline.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
