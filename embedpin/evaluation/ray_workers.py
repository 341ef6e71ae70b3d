"""Ray workers: a generation's candidates rendered across GPUs and nodes, with one machine's result.

One actor per GPU (``num_gpus=1``; CPU actors where the cluster has no GPU or ``--device cpu``)
builds its own ``Session`` from the run's config (a small dict), in its first ``ready`` call: the model,
targets and guidance context are loaded in the worker, never pickled from the driver. The driver
(``embedpin.runner``) keeps the optimizer, every seed, the store and the reports; per evaluation
:class:`RayEvaluator` splits the candidates into contiguous chunks, one per alive worker, sends
each chunk's standardized vectors with the driver's plan, and puts the returned compact batches
(``evaluation.batch``) back together by chunk index, never by arrival. A candidate's figures are a
function of (its x, the plan) only, so they do not depend on which worker ran it; on CPU they equal
the in-process run's to float rounding (a chunk is a smaller batch through the same kernels).

Scheduling is one loop over ``ray.wait``: each queued chunk goes to the first idle worker, and

- a worker that dies mid-chunk (killed, out of memory, node lost: ``RayActorError``) has its chunk
  queued again at the front, for the next idle worker; Ray restarts the actor (``max_restarts`` =
  ``--worker-restarts``, reloading the model) and the worker rejoins when its ``ready`` call
  answers. Chunks are resubmitted by this loop rather than by Ray (``max_task_retries`` = 0): a
  retry goes to whichever worker is free first, not only to the restarted one, and every restart
  is counted and reported;
- a chunk with no answer within ``--worker-timeout`` seconds marks its worker hung: it is killed
  (``ray.kill``, restartable) and the chunk re-runs as for a death;
- a worker Ray reports dead (``ActorDiedError``: its restarts used up) is given up; on the local
  cluster of ``--workers N`` it may instead mean that the cluster's one node was lost (its raylet
  died: it fate-shares with Ray's agent processes, ``ray::DashboardAgent`` and
  ``ray::RuntimeEnvAgent``, so one of those killed takes every worker with it): the evaluator
  then starts the local cluster again and every worker reloads, each counting one restart (Ray's
  core worker ends this process itself there when it has no parent process left, a run started
  with ``nohup`` from a closed shell: the run folder stays resumable);
- with no worker alive or restarting, :class:`~embedpin.errors.WorkerError` ends the run, which
  the run loop leaves resumable.

A restart is counted for every worker process replaced: a loss seen under a call, and one Ray
did unseen (a worker killed while idle or loading answers ``ready`` from a new process).

Connecting: ``--workers N`` without an address starts a local cluster (shut down at the end) with
:data:`LOCAL_SYSTEM`'s settings;
``--ray-address`` (or ``RAY_ADDRESS``) joins one started with ``ray start --head``, after a
seconds-long probe of the address (Ray's own connect retries for minutes on a wrong one). Ray's
log lines stay off the terminal (``log_to_driver=False``, ERROR level); its SIGTERM handler
(exit with cleanup) is kept and the run loop's Ctrl-C handler is installed after it.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from embedpin.config import RunConfig, ScaleConfig
from embedpin.errors import ConfigError, EmbedpinError, WorkerError
from embedpin.evaluation.batch import Batch, Pinned, RunInfo, Starts
from embedpin.evaluation.session import Session
from embedpin.render.sampler import RenderPlan

CONTROL = "control"  # the actors' second thread: status answers while a chunk renders
NAMESPACE = "embedpin"
POLL = 1.0           # seconds between checks of deadlines (and for Ctrl-C) while waiting
PROBE_TIMEOUT = 5.0  # seconds to reach a --ray-address
LOAD_TIMEOUT = 600.0  # seconds a worker's model load may take at least (big checkpoints on slow disks)
RETRY = 0.5          # seconds between asking a restarting worker whether it is back
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame
# The local cluster's Ray settings. Ray runs its workers at nice 15 so that its own processes keep
# the CPU on a busy node; on a machine shared with other work that starves the workers against
# every other process (README: "Several GPUs, or a cluster"), a killed worker's reload included,
# so they run at the priority the in-process run has. Ray's own processes need little CPU.
LOCAL_SYSTEM = {"worker_niceness": 0}
_EVALUATORS = itertools.count()  # numbers this process's evaluators: actor names stay unique


class NotLoaded(RuntimeError):
    """A call reached a worker process Ray restarted unseen: it must answer ``ready`` first."""


@ray.remote(concurrency_groups={CONTROL: 1})
class Worker:
    """One render worker: a Session prepared in the actor from the run's config dict.

    The session is prepared by the first :meth:`ready` call, not in the constructor: an actor
    with a concurrency group runs its methods on a thread of its own, and torch work done on two
    threads of one process (the constructor's and the methods') gives each its own OpenMP team,
    whose spinning threads then compete for the cores (measured on 2 CPU cores: the micro UNet
    1.5x slower than with one thread doing it all). A mistake in the config (a missing target,
    a bad model) is raised by :meth:`ready`, so the driver reports it as the one-line error it
    is, instead of Ray restarting the actor."""

    def __init__(self, config: dict, name: str, device: str):
        self.config, self.name, self.device, self.busy, self.session = config, name, device, None, None

    def ready(self) -> tuple[RunInfo, int, bool]:
        """(the run's description, this process's pid, whether Ray restarted this actor) once the
        session is loaded (here, on the thread every later call runs on; ``busy`` says "loading"
        meanwhile)."""
        if self.session is None:
            cfg = RunConfig.from_dict(self.config)
            cfg.model.device = self.device
            self.session = self._busy("loading", Session.prepare, cfg)
        return self.session.info(), os.getpid(), ray.get_runtime_context().was_current_actor_reconstructed

    def evaluate(self, X: np.ndarray, plan: RenderPlan, label: str, vectors=None) -> Batch:
        return self._busy(label, self._loaded(vectors).batch, X, plan, self.name)

    def plain(self, plan: RenderPlan, label: str, vectors=None) -> Batch:
        return self._busy(label, self._loaded(vectors).plain_batch, plan, self.name)

    def pinned(self, x: np.ndarray | None, label: str, vectors=None) -> Pinned:
        return self._busy(label, self._loaded(vectors).pinned, x)

    def invert(self, label: str, vectors=None) -> tuple[Starts, list[float]]:
        """The run's inversion stage (``Session.invert``): (the possible starts, each step's loss)."""
        losses: list[float] = []
        fitted = self._busy(label, self._loaded(vectors).invert, lambda step, loss: losses.append(loss))
        return fitted, losses

    def _loaded(self, vectors: np.ndarray | None) -> Session:
        """The session, its token vectors started at ``vectors`` (the run's inversion, sent with
        every call, so that a restarted worker renders what the others do)."""
        if self.session is None:  # Ray restarted this actor after its ready answer (killed while idle)
            raise NotLoaded(f"worker {self.name} was restarted (pid {os.getpid()}) and has not loaded its model")
        self.session.use_vectors(vectors)
        return self.session

    def _busy(self, label: str, fn, *args):
        self.busy = label
        try:
            return fn(*args)
        finally:
            self.busy = None

    @ray.method(concurrency_group=CONTROL)
    def status(self) -> dict:
        """What the worker is doing now (``busy``: the label of its chunk, "loading", or None), its
        pid and node, and the embedpin package it imported (a folder)."""
        return {"name": self.name, "pid": os.getpid(), "busy": self.busy, "gpus": ray.get_gpu_ids(),
                "node": ray.get_runtime_context().get_node_id(), "embedpin": str(Path(__file__).resolve().parents[1])}


@dataclass
class _Call:
    """One method call to run on some worker (a chunk, the plain prompt, a pinned conditioning)."""

    method: str
    args: tuple
    label: str
    timeout: float | None = None  # seconds it may take before its worker counts as hung (None: --worker-timeout)


@dataclass
class _Slot:
    """A worker as the driver tracks it: its actor, state (idle, busy, restarting, dead), the
    deadline of what it is doing, the ref it is doing it under, and its counts."""

    name: str
    actor: object
    state: str = "starting"
    ref: object = None
    deadline: float = float("inf")
    retry: float = 0.0
    pid: int | None = None
    counted: bool = False  # a restart already counted for the process it is waiting for
    counts: dict = field(default_factory=lambda: {"candidates": 0, "images": 0, "seconds": 0.0, "restarts": 0})

    def report(self) -> dict:
        """Its counts; ``alive``: not given up (working, or restarting)."""
        return {"worker": self.name, "alive": self.state != "dead", **self.counts,
                "seconds": round(self.counts["seconds"], 3)}


class RayEvaluator:
    """Renders on Ray workers (``evaluation.evaluate.Evaluator``); see the module doc."""

    device = "cpu"  # the driver's own figures (error maps) are computed on its CPU

    def __init__(self, config: RunConfig, scale: ScaleConfig, notify=None):
        self.scale = scale.validate()
        self.notify = notify or (lambda message: print(f"note: {message}", file=sys.stderr))
        self.slots: list[_Slot] = []
        self.arrivals: deque = deque(maxlen=64)  # (label, chunk indices in the order they came back) per call
        self.traffic = {"sent": 0, "received": 0}  # bytes (pickled calls; returned arrays)
        self.why = ""  # the last reason a worker was lost
        self.config, self.lost_node = config, ""
        self.vectors: np.ndarray | None = None  # the token vectors every call starts from (use_vectors)
        self.started = _connect(config, scale)
        self.local = self.started and not scale.ray_address  # a cluster this evaluator started (and may restart)
        try:
            self.options, n, self.device_name = _placement(config, scale)
            if short := _short_of(self.options, n):
                self.notify(f"the Ray cluster has {short} free now: the workers start as it frees them")
            self.prefix = f"embedpin-{os.getpid()}-{next(_EVALUATORS)}"
            self.slots = [_Slot(f"w{i}", self._actor(f"w{i}", scale.worker_restarts)) for i in range(n)]
            self.info = self._start()
        except BaseException:
            self.close()
            raise

    def _actor(self, name: str, restarts: int):
        """A new worker actor ``name`` that Ray may restart ``restarts`` times."""
        return Worker.options(**self.options, name=f"{self.prefix}-{name}", namespace=NAMESPACE,
                              max_restarts=restarts, max_task_retries=0,
                              max_concurrency=1).remote(self.config.to_dict(), name, self.device_name)

    # -- the Evaluator interface ----------------------------------------------------------
    @property
    def workers(self) -> list[dict]:
        """Per worker: alive (not given up), candidates and images rendered, seconds spent, restarts."""
        return [s.report() for s in self.slots]

    def alive(self) -> tuple[int, int]:
        """(workers ready to render now, workers started)."""
        return sum(s.state in ("idle", "busy") for s in self.slots), len(self.slots)

    def evaluate(self, X: np.ndarray, plan: RenderPlan, label: str = "") -> Batch:
        """Candidates X [k, n] on ``plan``: contiguous chunks, one per alive worker, put back in order."""
        X = np.asarray(X, dtype=np.float64)
        chunks = np.array_split(np.arange(len(X)), max(1, min(len(X), self.alive()[0])))
        calls = [_Call("evaluate", (X[idx], plan, f"{label} [{idx[0]}:{idx[-1] + 1}]"), label) for idx in chunks]
        return Batch.concat(self._run(calls))

    def evaluate_plain(self, plan: RenderPlan) -> Batch:
        return self._run([_Call("plain", (plan, "plain prompt"), "plain prompt")])[0]

    def pinned(self, x: np.ndarray | None) -> Pinned:
        return self._run([_Call("pinned", (x, "pinned"), "pinned")])[0]

    def invert(self, progress=None) -> Starts | None:
        """The inversion stage on one worker (re-run on another if it is lost); its losses are
        replayed into ``progress`` when it is back. Once per run, like a model load, it may take as
        long as a load (``--worker-timeout``, at least ``LOAD_TIMEOUT``) per 100 steps."""
        if not self.config.inverts():
            return None
        allowed = max(self.scale.worker_timeout, LOAD_TIMEOUT) * max(1.0, self.config.search.inversion_steps / 100)
        call = _Call("invert", ("inversion",), "inversion", timeout=allowed)
        fitted, losses = self._run([call])[0]
        for step, loss in enumerate(losses):
            if progress is not None:
                progress(step, loss)
        return fitted

    def use_vectors(self, vectors: np.ndarray | None) -> None:
        """Every later call starts the workers' token vectors at ``vectors`` (sent with the call)."""
        self.vectors = None if vectors is None else np.asarray(vectors, dtype=np.float32)

    def close(self) -> None:
        """Stop the workers; shut Ray down if this evaluator started it."""
        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.slots = []
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False

    # -- start-up -------------------------------------------------------------------------
    def _start(self) -> RunInfo:
        """Wait until every worker has loaded its session (or is gone for good); a config mistake
        raises as itself. Returns the run's description, checked to be the same on every worker."""
        infos: dict[str, RunInfo] = {}
        for slot in self.slots:
            self._await_ready(slot, time.monotonic())
        while any(s.state == "restarting" for s in self.slots):
            for slot, info in self._wait_any():
                if info is not None:
                    infos[slot.name] = info
        if not infos:
            raise WorkerError(self._none_left("no Ray worker started"))
        first = next(iter(infos.values()))
        size = [(i.config["render"]["height"], i.config["render"]["width"]) for i in infos.values()]
        if any(i.space != first.space for i in infos.values()) or len(set(size)) > 1:
            raise WorkerError("the Ray workers built different search spaces: install the same embedpin, model and "
                              "input files on every node")
        return first

    def _await_ready(self, slot: _Slot, now: float) -> None:
        """Wait for ``slot``'s ``ready`` answer after a (re)start; a model load may take the worker
        timeout, and at least ``LOAD_TIMEOUT``."""
        slot.state, slot.ref, slot.retry = "restarting", None, now
        slot.deadline = now + max(self.scale.worker_timeout, LOAD_TIMEOUT)

    # -- the scheduling loop --------------------------------------------------------------
    def _run(self, calls: list[_Call]) -> list:
        """Run ``calls``, each on the first idle worker; results in call order (not arrival)."""
        results: list = [None] * len(calls)
        queue, running, arrived = deque(range(len(calls))), {}, []
        self.arrivals.append((calls[0].label, arrived))
        while queue or running:
            for slot in [s for s in self.slots if s.state == "idle"]:
                if not queue:
                    break
                i = queue.popleft()
                self._submit(slot, calls[i])
                running[slot.name] = i
            if not any(s.state in ("busy", "restarting") for s in self.slots):
                raise WorkerError(self._none_left(f"no Ray worker left for {calls[queue[0]].label}"))
            for slot, value in self._wait_any():
                if slot.name not in running:
                    continue
                i = running.pop(slot.name)
                if slot.state == "idle" and value is not None:  # came back with a result
                    results[i] = value
                    arrived.append(i)
                else:                                           # lost: the call goes first in line again
                    queue.appendleft(i)
        return results

    def _submit(self, slot: _Slot, call: _Call) -> None:
        args = (*call.args, self.vectors)
        self.traffic["sent"] += len(pickle.dumps(args, protocol=5))
        slot.state, slot.ref = "busy", getattr(slot.actor, call.method).remote(*args)
        slot.deadline = time.monotonic() + (call.timeout or self.scale.worker_timeout)

    def _wait_any(self) -> list[tuple[_Slot, object]]:
        """Wait (up to POLL seconds) for busy and restarting workers; returns [(slot, value)] for
        those that answered, after settling each one's state (value None: lost, or not back yet).
        Workers past their deadline are killed as hung."""
        now = time.monotonic()
        for s in self.slots:
            if s.state == "restarting" and s.ref is None and now >= s.retry:
                s.ref = s.actor.ready.remote()
        active = [s for s in self.slots if s.state in ("busy", "restarting")]
        waiting = {s.ref: s for s in active if s.ref is not None}
        wake = [s.deadline for s in active] + [s.retry for s in active if s.ref is None]
        timeout = max(0.0, min([POLL, *(t - now for t in wake)]))
        if waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
        else:
            done = []
            time.sleep(timeout)
        out = [(waiting[ref], self._settle(waiting[ref], ref)) for ref in done]
        if self.lost_node:
            answered = {id(s) for s, _ in out}
            return out + [(s, None) for s in self._restart_cluster() if id(s) not in answered]
        now = time.monotonic()
        for slot in active:
            if slot.state in ("busy", "restarting") and now > slot.deadline:
                out.append((slot, self._hung(slot)))
        return out

    def _settle(self, slot: _Slot, ref) -> object:
        """The answer of ``slot``'s call: a result (the slot goes idle) or None (lost, or not back
        yet). An embedpin error raised in a worker is raised here as itself (one line for the user)."""
        try:
            value = ray.get(ref)
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), NotLoaded):
                return self._lost(slot, _first_line(e.cause))
            if slot.state == "restarting" and not isinstance(_cause(e), EmbedpinError):
                return self._dead(slot, f"its model did not load: {_first_line(_cause(e))}")
            raise _cause(e) from None
        except ActorDiedError as e:  # Ray will not restart it: restarts used up, or (local cluster) the node lost
            if self.local and (lost := _node_lost()):
                self.lost_node = lost
                return None
            return self._dead(slot, _first_line(e))
        except RayActorError as e:   # unavailable: it died and Ray restarts it
            if slot.state == "restarting":  # not back yet: ask again shortly
                slot.ref, slot.retry = None, time.monotonic() + RETRY
                return None
            return self._lost(slot, _first_line(e))
        slot.ref = None
        if slot.state == "restarting":  # a (re)started worker's ready answer
            info, pid, restarted = value
            unseen = not slot.counted and pid != slot.pid and (restarted or slot.pid is not None)
            if unseen:  # Ray restarted it without a call of ours failing (killed while loading)
                slot.counts["restarts"] += 1
            if unseen or slot.counted:
                self.notify(f"worker {slot.name} is back (restart {slot.counts['restarts']})")
            slot.pid, slot.state, slot.counted = pid, "idle", False
            return info
        slot.state = "idle"
        self._count(slot, value)
        return value

    def _count(self, slot: _Slot, value) -> None:
        if isinstance(value, Batch):
            slot.counts["candidates"] += len(value)
            slot.counts["images"] += int(np.prod(value.images.shape[:2]))
            slot.counts["seconds"] += sum(value.seconds.values())
            self.traffic["received"] += value.nbytes

    def _lost(self, slot: _Slot, why: str) -> None:
        """A worker died (or hung) under a call: the call goes to another worker while Ray restarts
        this one (reloading its model)."""
        slot.counts["restarts"] += 1
        slot.counted = True
        self.notify(f"worker {slot.name} lost ({why}); its candidates re-run on another worker while it restarts "
                    f"({slot.counts['restarts']} of {self.scale.worker_restarts})")
        self._await_ready(slot, time.monotonic())
        return None

    def _hung(self, slot: _Slot) -> None:
        """No answer within the timeout: kill the worker, to restart if it has restarts left."""
        busy = slot.state == "busy"
        allowed = self.scale.worker_timeout if busy else max(self.scale.worker_timeout, LOAD_TIMEOUT)
        why = f"hung: {'a chunk' if busy else 'its model load'} took over {allowed:g} s"
        last = slot.counts["restarts"] >= self.scale.worker_restarts
        ray.kill(slot.actor, no_restart=last)
        return self._dead(slot, why) if last else self._lost(slot, why)

    def _dead(self, slot: _Slot, why: str) -> None:
        slot.state, slot.ref, slot.deadline = "dead", None, float("inf")
        self.why = why
        ray.kill(slot.actor, no_restart=True)
        self.notify(f"worker {slot.name} is gone ({why}); {self.alive()[0]} of {len(self.slots)} left")
        return None

    def _restart_cluster(self) -> list[_Slot]:
        """The local cluster's node was lost (``self.lost_node`` says how): start the cluster again
        with a new actor per worker (each counts a restart; one with none left is given up). Returns
        the workers that were busy: their calls go back in line."""
        why, self.lost_node = self.lost_node, ""
        busy = [s for s in self.slots if s.state == "busy"]
        self.notify(f"the local Ray node was lost ({why}); starting it again, every worker reloads its model")
        ray.shutdown()
        try:
            self.started = _connect(self.config, self.scale)
        except Exception as e:  # noqa: BLE001 - Ray's own start-up errors, of any type
            self.started = False
            raise WorkerError(f"the local Ray node was lost and did not start again: {_first_line(e)}") from None
        now = time.monotonic()
        for slot in [s for s in self.slots if s.state != "dead"]:
            slot.counts["restarts"] += 1
            left = self.scale.worker_restarts - slot.counts["restarts"]
            if left < 0:
                slot.state, slot.ref, slot.deadline, self.why = "dead", None, float("inf"), why
                continue
            slot.actor, slot.pid, slot.counted = self._actor(slot.name, left), None, True
            self._await_ready(slot, now)
        return busy

    def _none_left(self, what: str) -> str:
        n = len(self.slots)
        return (f"{what}: all {n} worker{'s' if n != 1 else ''} died or hung, each restarted up to "
                f"{self.scale.worker_restarts} time(s) (last: {self.why or 'unknown'})")


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return text if len(text) <= 160 else text[:157] + "..."


def _cause(e: RayTaskError) -> BaseException:
    """A worker's exception as itself: an embedpin error stays one line for the user."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, EmbedpinError) else e


# -- connecting and placing --------------------------------------------------------------
def _node_lost() -> str:
    """Why this process's Ray node is dead, as Ray says it ("": alive)."""
    me = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == me), {})
    return "" if node.get("Alive") else _first_line(node.get("DeathReasonMessage") or "its raylet is gone")


def _wants_gpu(config: RunConfig) -> bool:
    return config.model.device == "auto" or config.model.device.startswith("cuda")


def _connect(config: RunConfig, scale: ScaleConfig) -> bool:
    """Join ``scale.ray_address`` or start a local cluster sized for the workers; returns whether
    this process started it (then :meth:`RayEvaluator.close` shuts it down). A Ray already
    initialized in this process (a notebook's ``ray.init()``) is used as it is."""
    address = scale.ray_address
    if address:
        probe(address)
    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise WorkerError(f"cannot join the Ray cluster at {address}: {_first_line(e)}") from None
        return True
    cpus, gpus = _local_resources(config, scale)
    package_root = str(Path(__file__).resolve().parents[2])  # workers import this embedpin, as the driver does
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": {"PYTHONPATH": path}},
             _system_config=LOCAL_SYSTEM, **quiet)
    return True


def _local_resources(config: RunConfig, scale: ScaleConfig) -> tuple[int, int]:
    """CPUs and GPUs of the local cluster for ``--workers N``: one GPU each where there are GPUs."""
    import torch

    n, cpus = scale.workers or 1, os.cpu_count() or 1
    gpus = torch.cuda.device_count() if _wants_gpu(config) else 0
    if gpus and n > gpus:
        raise ConfigError(f"--workers {n}: this machine has {gpus} GPU(s) and a worker renders on one GPU "
                          f"(--device cpu: CPU workers)")
    return max(cpus, n), min(gpus, n)


def _placement(config: RunConfig, scale: ScaleConfig) -> tuple[dict, int, str]:
    """(actor resources, number of workers, the device they render on) on the connected cluster:
    one worker per GPU (``--workers`` of them, default all), else CPU workers sharing the CPUs
    (default: one per node, with all of that node's CPUs)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if _wants_gpu(config) else 0
    if gpus:
        n = scale.workers or gpus
        if n > gpus:
            raise ConfigError(f"--workers {n}: the Ray cluster has {gpus} GPU(s) and a worker renders on one GPU")
        return {"num_gpus": 1, "num_cpus": 1}, n, "cuda"
    if config.model.device.startswith("cuda"):
        raise ConfigError(f"--device {config.model.device}: the Ray cluster has no GPU")
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    node_cpus = min((int(node["Resources"].get("CPU", 0)) for node in nodes), default=0)
    total = int(res.get("CPU", 0))
    n = scale.workers or max(1, len(nodes))
    if total < n:
        raise ConfigError(f"--workers {n}: the Ray cluster has {total} CPU(s), one at least per worker")
    device = "cpu" if config.model.device == "auto" else config.model.device
    return {"num_cpus": max(1, min(total // n, node_cpus))}, n, device


def _short_of(options: dict, n: int) -> str | None:
    """What the cluster has free, when that is less than ``n`` workers of ``options`` need."""
    free = ray.available_resources()
    need = {"CPU": options.get("num_cpus", 0) * n, "GPU": options.get("num_gpus", 0) * n}
    short = [f"{free.get(k, 0):g} of the {v:g} {k}s" for k, v in need.items() if v and free.get(k, 0) < v]
    return " and ".join(short) or None


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail within seconds unless something at ``address`` (HOST:PORT or ray://HOST:PORT) answers
    as a Ray cluster's gRPC server does (an HTTP/2 SETTINGS frame); ``auto`` is left to ``ray.init``,
    which fails at once when there is no local cluster."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            s.settimeout(timeout)
            s.sendall(H2_PREFACE)
            head = s.recv(9)
    except OSError as e:
        raise WorkerError(f"no Ray cluster at {address}: {e.strerror or type(e).__name__}") from None
    if len(head) < 4 or head[3] != 4:
        raise WorkerError(f"no Ray cluster at {address}: it does not answer as Ray's gRPC server")
