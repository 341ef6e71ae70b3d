"""Scale-out on Ray workers, on one local CPU cluster per session (``ray_cluster``, conftest).

``--workers 2`` gives the in-process run's result (``finished``): the same per-generation and
validation losses to 1e-5 and the same pinned candidate, also while, during that run, a worker is
stalled so that the other finishes first (results still in candidate order) and a worker process
is SIGKILLed mid-chunk (its candidates re-run). A hung last worker is caught by the timeout and
stops the run with one ``error:`` line, resumable; a wrong ``--ray-address`` is one ``error:``
line within seconds, never a hang.
"""

import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'embedpin[ray]' (the test extra has it)")

from micro_run import PROMPT, STAR, optimize_args, runs  # noqa: E402

from embedpin.cli import main  # noqa: E402

TOL = 1e-5


def _state(run) -> dict:
    return json.loads((run / "state.json").read_text())


def _record(run, g: int) -> dict:
    return json.loads((run / "generations" / f"{g:04d}" / "generation.json").read_text())


def _until(check, what: str, timeout: float = 120.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _status(actor) -> dict:
    """A worker's status, once it answers (a restarting worker answers when it is back)."""
    def ask():
        try:
            return ray.get(actor.status.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return None
    return _until(ask, "a worker's status")


def _pid_when_busy(actor, prefix: str) -> int:
    """The worker's pid once it has started a chunk whose label starts with ``prefix`` (it says so)."""
    def busy():
        status = ray.get(actor.status.remote(), timeout=120)
        return status["pid"] if (status["busy"] or "").startswith(prefix) else None
    return _until(busy, f"a worker busy with {prefix!r}")


def _same_generation(got: dict, want: dict) -> None:
    for key in ("best", "median", "worst"):
        assert got[key] == pytest.approx(want[key], abs=TOL), (got["generation"], key)
    assert got["validation"].keys() == want["validation"].keys()
    for kind, loss in want["validation"].items():
        assert got["validation"][kind] == pytest.approx(loss, abs=TOL), (got["generation"], kind)
    assert (got["best_candidate"], got["renders"], got["unet_evals"]) == \
        (want["best_candidate"], want["renders"], want["unet_evals"])


def _same_candidates(got_run, want_run, g: int) -> None:
    """Generation g's candidates, one by one in candidate order: losses, per-image losses, parameters."""
    got, want = _record(got_run, g), _record(want_run, g)
    assert [c["index"] for c in got["candidates"]] == [c["index"] for c in want["candidates"]]
    for a, b in zip(got["candidates"], want["candidates"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL) and a["seeds"] == b["seeds"]
        np.testing.assert_allclose(a["image_losses"], b["image_losses"], atol=TOL)
        for name, values in b["params"].items():
            np.testing.assert_allclose(a["params"][name], values, atol=1e-9)


@pytest.fixture(scope="module")
def ray_run(ray_cluster, tmp_path_factory):
    """The small run on 2 Ray workers, while a script stalls worker 0 in generation 1 until worker 1's
    chunk is back (SIGSTOP, then SIGCONT) and SIGKILLs worker 1's process once it has started its
    chunk of generation 2. The evaluator is made here to reach its workers; the run loop is the
    CLI's (``runner.run``)."""
    from embedpin.api import run_config, scale_config
    from embedpin.optimizer.ray_workers import RayEvaluator
    from embedpin.runner import run

    out = tmp_path_factory.mktemp("ray-runs")
    config = run_config(target=STAR, prompt=PROMPT, out=str(out), generations=3, population=4, batch=4, steps=6,
                        validation_seeds=4)
    ev = RayEvaluator(config, scale_config(workers=2))
    events: dict = {}

    def script():
        try:
            w0, w1 = (slot.actor for slot in ev.slots)
            pid = _pid_when_busy(w0, "generation 1 [")
            os.kill(pid, signal.SIGSTOP)
            try:
                _until(lambda: ev.arrivals[-1][0] == "generation 1" and ev.arrivals[-1][1] == [1], "chunk 1 back")
            finally:
                os.kill(pid, signal.SIGCONT)
            events["stalled"] = pid
            pid = _pid_when_busy(w1, "generation 2 [")
            os.kill(pid, signal.SIGKILL)
            events["killed"] = pid
        except Exception as e:  # noqa: BLE001 - reported by the tests
            events["error"] = repr(e)

    thread = threading.Thread(target=script, daemon=True)
    thread.start()
    try:
        result = run(config, quiet=True, evaluator=ev)
        thread.join(timeout=60)
        seen = dict(run=result.run_dir, result=result, events=events, arrivals=list(ev.arrivals),
                    status=[_status(slot.actor) for slot in ev.slots])
    finally:
        ev.close()  # (its workers' CPUs are the next test's)
    return seen


def test_two_workers_give_the_in_process_result(ray_run, finished):
    got, want = _state(ray_run["run"]), _state(finished)
    assert got["status"] == "finished" and len(got["history"]) == len(want["history"]) == 3
    for a, b in zip(got["history"], want["history"]):
        _same_generation(a, b)
    assert got["plain_validation"]["loss"] == pytest.approx(want["plain_validation"]["loss"], abs=TOL)
    assert [got["best"][k] for k in ("generation", "candidate", "kind")] == \
        [want["best"][k] for k in ("generation", "candidate", "kind")]
    assert got["best"]["loss"] == pytest.approx(want["best"]["loss"], abs=TOL)
    from embedpin.pinned import load_pinned

    (a, _), (b, _) = load_pinned(ray_run["run"]), load_pinned(finished)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=TOL) for k in a)
    for g in range(3):
        _same_candidates(ray_run["run"], finished, g)
    assert all(s["embedpin"] == str(__import__("embedpin").__path__[0]) for s in ray_run["status"])  # this code


def test_results_come_back_in_candidate_order_when_a_worker_finishes_last(ray_run, finished):
    assert "error" not in ray_run["events"] and ray_run["events"]["stalled"]
    orders = [order for label, order in ray_run["arrivals"] if label == "generation 1"]
    assert orders == [[1, 0]]  # worker 1's chunk (candidates 2, 3) came back first
    _same_candidates(ray_run["run"], finished, 1)


def test_a_worker_killed_mid_generation_is_rerun_with_the_same_result(ray_run, finished):
    assert "error" not in ray_run["events"] and ray_run["events"]["killed"]
    w0, w1 = ray_run["result"].workers
    assert (w0["restarts"], w1["restarts"]) == (0, 1) and w0["alive"] and w1["alive"]
    assert ray_run["status"][1]["pid"] != ray_run["events"]["killed"]  # a new process took over
    _same_candidates(ray_run["run"], finished, 2)
    _same_generation(_state(ray_run["run"])["history"][2], _state(finished)["history"][2])


def test_json_progress_and_report_show_the_workers(ray_run, finished):
    summary = ray_run["result"].summary()
    counts = summary["workers"]
    assert [w["worker"] for w in counts] == ["w0", "w1"]
    assert sum(w["candidates"] for w in counts) == 3 * 4 + 5 + 1  # search, validated (best, 2 means), plain
    assert sum(w["images"] for w in counts) == summary["renders"] == 3 * 4 * 4 + 5 * 4 + 4
    assert all(w["seconds"] > 0 for w in counts)
    history = _state(ray_run["run"])["history"]
    assert all(h["workers"] and min(h["workers"].values()) > 0 for h in history)
    assert set(history[1]["workers"]) == {"w0", "w1"}  # (in generation 2 w0 also ran the killed w1's chunk)
    assert "workers" not in _state(finished)["history"][0]  # in-process runs keep their state as before
    page = (ray_run["run"] / "index.html").read_text()
    assert "worker seconds" in page and "w0 " in page and "w1 " in page


def _new_worker(prefix: str, known: set):
    """The first Ray worker actor named ``prefix…`` that is not in ``known``."""
    def find():
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "embedpin"}
        fresh = sorted(n for n in names - known if n.startswith(prefix))
        return fresh[0] if fresh else None
    return ray.get_actor(_until(find, "the run's worker"), namespace="embedpin")


def test_a_hung_last_worker_stops_the_run_resumable_with_one_error_line(ray_cluster, ray_run, finished, tmp_path,
                                                                        capsys):
    """One worker, no restarts, joined through --ray-address: stopped (SIGSTOP) once it has started
    generation 0, it is caught by --worker-timeout; with no worker left the run ends with exit 2 and
    one error line, marked interrupted; --resume (in-process) then renders generation 0 as the
    in-process run did (validation off here: the search alone, to keep the test short)."""
    prefix = f"embedpin-{os.getpid()}-"
    known = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    stopped = []

    def script():
        pid = _pid_when_busy(_new_worker(prefix, known), "generation 0 [")
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    thread = threading.Thread(target=script, daemon=True)
    thread.start()
    argv = optimize_args(tmp_path, "--generations", "1", "--validation-seeds", "0", "--workers", "1",
                         "--worker-restarts", "0", "--worker-timeout", "3", "--ray-address", ray_cluster)
    try:
        assert main(argv) == 2
    finally:
        thread.join(timeout=10)
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
    assert stopped, "the worker was never seen busy"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    (run,) = runs(tmp_path)
    assert len(err) == 1 and err[0].startswith("error: no Ray worker left") and "hung" in err[0], err
    assert err[0].endswith(f"embedpin optimize --resume {run}")
    state = _state(run)
    assert state["status"] == "interrupted" and state["generation"] == 0 and state["stop_reason"].startswith("error:")
    assert main(["optimize", "--resume", str(run), "--quiet"]) == 0
    got, want = _state(run)["history"], _state(finished)["history"]
    assert _state(run)["status"] == "finished" and len(got) == 1
    assert [got[0][k] for k in ("best", "median", "worst", "best_candidate")] == \
        pytest.approx([want[0][k] for k in ("best", "median", "worst", "best_candidate")], abs=TOL)
    _same_candidates(run, finished, 0)


def _not_ray_server():
    """A listening TCP server that answers like a web server: (address, stop)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}", done.set


def _closed_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}", lambda: None


@pytest.mark.parametrize("server", [_closed_port, _not_ray_server])
def test_a_wrong_ray_address_is_one_error_line_within_seconds(tmp_path, capsys, server):
    address, stop = server()
    try:
        t = time.monotonic()
        assert main(optimize_args(tmp_path, "--ray-address", address)) == 2
        elapsed = time.monotonic() - t
    finally:
        stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no Ray cluster at {address}"), err
    assert elapsed < 10 and runs(tmp_path) == []


def test_scale_settings_come_from_flags_the_environment_and_the_api(monkeypatch):
    from embedpin.api import resume, scale_config
    from embedpin.errors import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not scale_config().distributed and scale_config(workers=2).distributed
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert scale_config().ray_address == "10.0.0.1:6379" and scale_config(ray_address="h:1").ray_address == "h:1"
    with pytest.raises(ConfigError, match="--workers must be >= 0"):
        scale_config(workers=-1)
    with pytest.raises(ConfigError, match="unknown setting"):
        resume("runs/x", steps=3)
