"""Scale-out on Ray workers, on one 2-node Ray cluster per session (``ray_cluster``, conftest), through
the CLI (``--ray-address``): a script beside the run finds its workers by their actor names, asks
each what it is doing (``Worker.status``) and kills one at the moment it chooses.

``--workers 2`` gives the in-process run's result (``finished``): the same per-generation and
validation losses to 1e-5 and the same pinned candidate, while, during that one run, a worker is
SIGKILLed while loading its model, during the validation renders, mid-chunk in the search and while
idle between generations, and a worker is stalled so that the other finishes first (results still in
candidate order); every kill is a restart the user sees in ``--json``. A worker killed with its
whole node re-runs its candidates on the other node; workers killed again and again, or a hung last
worker, stop the run resumable with one ``error:`` line within ``--worker-timeout``; a killed Ray
agent (the local node lost) costs embedpin's own local cluster a restart, not the run; a wrong
``--ray-address`` is one ``error:`` line within seconds, never a hang.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'embedpin[ray]' (the test extra has it)")

from support.micro_run import ROOT, optimize_args, runs  # noqa: E402

from embedpin.cli import main  # noqa: E402

TOL = 1e-5
ONE = ["--generations", "1"]  # a short run: the inversion, its starts validated (the search starts where
# ``finished``'s did), generation 0


def _state(run) -> dict:
    return json.loads((run / "state.json").read_text())


def _record(run, g: int) -> dict:
    return json.loads((run / "generations" / f"{g:04d}" / "generation.json").read_text())


def _until(check, what: str, timeout: float = 300.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _ask(actor, timeout: float = 30.0) -> dict | None:
    """A worker's status (``Worker.status``), None while it is down or restarting."""
    try:
        return ray.get(actor.status.remote(), timeout=timeout)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def _busy_with(actor, prefix: str) -> dict:
    """The worker's status once it says it is busy with something labelled ``prefix…``."""
    def busy():
        status = _ask(actor)
        return status if status and (status["busy"] or "").startswith(prefix) else None
    return _until(busy, f"a worker busy with {prefix!r}")


def _workers(n: int) -> list:
    """The next run's n worker actors (w0, w1, …), found by name as soon as the run creates them."""
    prefix = f"embedpin-{os.getpid()}-"
    known = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}

    def find():
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "embedpin"}
        fresh = sorted(x for x in names - known if x.startswith(prefix))
        return fresh if len(fresh) >= n else None
    return lambda: [ray.get_actor(name, namespace="embedpin") for name in _until(find, "the run's workers")]


def _kill(status: dict, phase: str, events: list) -> None:
    os.kill(status["pid"], signal.SIGKILL)
    events.append({"phase": phase, "at": time.monotonic(), **status})


def _beside(script, *args) -> tuple[threading.Thread, dict]:
    """Run ``script(*args, events)`` on a thread beside the run; its events, or its error, in the dict."""
    out: dict = {"events": []}

    def go():
        try:
            script(*args, out["events"])
        except Exception as e:  # noqa: BLE001 - reported by the tests
            out["error"] = repr(e)
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def _cli(argv) -> tuple[int, str]:
    """``embedpin`` run in this process: (exit code, its stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


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


def _chaos(find, out, events: list) -> None:
    """Kill a worker process in each phase of the small run (the kills alternate between workers, so
    neither uses up its 3 restarts) and stall worker 0 in generation 0 until worker 1's chunk is back."""
    w0, w1 = find()
    _kill(_busy_with(w0, "loading"), "loading", events)               # its first model load
    stalled = _busy_with(w0, "generation 0 [")                          # both have a chunk of generation 0
    os.kill(stalled["pid"], signal.SIGSTOP)
    try:
        _busy_with(w1, "generation 0 [")
        _until(lambda: (s := _ask(w1)) and not (s["busy"] or "").startswith("generation 0 ["), "w1's chunk back")
        events.append({"phase": "stalled", **stalled})
    finally:
        os.kill(stalled["pid"], signal.SIGCONT)
    _kill(_busy_with(w1, "generation 0 validation"), "validation", events)
    _kill(_busy_with(w0, "generation 1 ["), "search", events)
    _until(lambda: list(out.glob("*/generations/0001")), "generation 1 committed")
    idle = _until(lambda: next((s for a in (w1, w0) if (s := _ask(a, 1)) and s["busy"] is None), None), "an idle worker")
    _kill(idle, "between generations", events)


@pytest.fixture(scope="module")
def ray_run(ray_cluster, tmp_path_factory):
    """The small run through the CLI on 2 Ray workers (one per node) while :func:`_chaos` kills and stalls
    them: (its run folder, --json summary, the script's events)."""
    out = tmp_path_factory.mktemp("ray-runs")
    thread, seen = _beside(_chaos, _workers(2), out)
    code, stdout = _cli(optimize_args(out, "--json", "--workers", "2", "--ray-address", ray_cluster.address))
    thread.join(timeout=60)
    (run,) = runs(out)
    return dict(code=code, run=run, summary=json.loads(stdout.strip().splitlines()[-1]), **seen)


def test_two_workers_give_the_in_process_result_while_workers_are_killed_in_every_phase(ray_run, finished):
    assert "error" not in ray_run, ray_run.get("error")
    assert [e["phase"] for e in ray_run["events"]] == \
        ["loading", "stalled", "validation", "search", "between generations"]
    got, want = _state(ray_run["run"]), _state(finished)
    assert ray_run["code"] == 0 and got["status"] == "finished" and len(got["history"]) == len(want["history"]) == 3
    for a, b in zip(got["history"], want["history"]):
        _same_generation(a, b)
    assert got["plain_validation"]["loss"] == pytest.approx(want["plain_validation"]["loss"], abs=TOL)
    assert [got["best"][k] for k in ("generation", "candidate", "kind")] == \
        [want["best"][k] for k in ("generation", "candidate", "kind")]
    assert got["best"]["loss"] == pytest.approx(want["best"]["loss"], abs=TOL)
    from embedpin.exports import load_pinned

    (a, _), (b, _) = load_pinned(ray_run["run"]), load_pinned(finished)
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=TOL) for k in a)
    for g in range(3):
        _same_candidates(ray_run["run"], finished, g)
    assert all(e["embedpin"] == str(__import__("embedpin").__path__[0]) for e in ray_run["events"])  # this code


def test_results_come_back_in_candidate_order_when_a_worker_finishes_last(ray_run, finished):
    """Worker 0 was stopped with its chunk of generation 0 (candidates 0, 1) until worker 1's chunk
    (2, 3) was back: the generation is still the in-process one, candidate by candidate."""
    assert any(e["phase"] == "stalled" and e["name"] == "w0" for e in ray_run["events"])
    _same_candidates(ray_run["run"], finished, 0)


def test_every_kill_is_a_restart_the_user_sees(ray_run):
    kills = [e["name"] for e in ray_run["events"] if e["phase"] != "stalled"]
    workers = ray_run["summary"]["workers"]
    assert [(w["worker"], w["restarts"], w["alive"]) for w in workers] == \
        [(name, kills.count(name), True) for name in ("w0", "w1")]
    killed = {e["pid"] for e in ray_run["events"] if e["phase"] != "stalled"}
    assert len(killed) == len(kills)  # a new process each time


def test_json_progress_and_report_show_the_workers(ray_run, finished):
    summary = ray_run["summary"]
    counts = summary["workers"]
    assert [w["worker"] for w in counts] == ["w0", "w1"]
    # search, validated (best, 2 means), plain, the inversion's starts (init words + 2 points)
    assert sum(w["candidates"] for w in counts) == 3 * 4 + 5 + 1 + 3
    assert sum(w["images"] for w in counts) == summary["renders"] == 3 * 4 * 4 + 5 * 4 + 4 + 3 * 4
    assert all(w["seconds"] > 0 for w in counts)
    history = _state(ray_run["run"])["history"]
    assert all(h["workers"] and min(h["workers"].values()) > 0 for h in history)
    assert set(history[0]["workers"]) == {"w0", "w1"}
    assert "workers" not in _state(finished)["history"][0]  # in-process runs keep their state as before
    page = (ray_run["run"] / "index.html").read_text()
    assert "worker seconds" in page and "w0 " in page and "w1 " in page


def _node_goes(find, cluster, events: list) -> None:
    """SIGKILL the worker on the second node mid-chunk, then remove that node from the cluster."""
    workers = find()
    node = next(iter(cluster.worker_nodes))
    victim = next(a for a in workers if _until(lambda a=a: _ask(a), "a status")["node"] == node.node_id)
    _kill(_busy_with(victim, "generation 0 ["), "search", events)
    cluster.remove_node(node)
    events.append({"phase": "node removed", "node": node.node_id})


def test_a_worker_killed_with_its_whole_node_reruns_on_the_other_node(ray_cluster, finished, tmp_path):
    thread, seen = _beside(_node_goes, _workers(2), ray_cluster)
    try:
        code, stdout = _cli(optimize_args(tmp_path, *ONE, "--json", "--workers", "2", "--ray-address",
                                          ray_cluster.address))
        thread.join(timeout=60)
    finally:
        if len(ray_cluster.worker_nodes) == 0:  # the next tests' second CPU
            ray_cluster.add_node(num_cpus=1)
            ray_cluster.wait_for_nodes()
    assert "error" not in seen, seen.get("error")
    assert code == 0 and [e["phase"] for e in seen["events"]] == ["search", "node removed"]
    (run,) = runs(tmp_path)
    _same_candidates(run, finished, 0)
    gone = next(e["name"] for e in seen["events"] if e["phase"] == "search")
    workers = {w["worker"]: w for w in json.loads(stdout.strip().splitlines()[-1])["workers"]}
    assert workers[gone]["restarts"] == 1 and workers[gone]["candidates"] == 0  # its chunk ran on the other node
    assert sum(w["candidates"] for w in workers.values()) == 4 + 1 + 3 + 2  # search, plain, starts, validated


def _inversion_goes(find, events: list) -> None:
    """SIGKILL whichever worker runs the inversion stage, mid-stage."""
    workers = find()

    def busy():
        return next((s for a in workers if (s := _ask(a, 1)) and s["busy"] == "inversion"), None)
    _kill(_until(busy, "a worker in the inversion stage"), "inversion", events)


def test_a_worker_killed_in_the_inversion_stage_reruns_it_to_the_same_vectors(ray_cluster, finished, tmp_path):
    from embedpin.store import INVERSION, read_vectors

    thread, seen = _beside(_inversion_goes, _workers(2))
    code, stdout = _cli(optimize_args(tmp_path, *ONE, "--json", "--workers", "2", "--ray-address",
                                      ray_cluster.address))
    thread.join(timeout=60)
    assert "error" not in seen, seen.get("error")
    assert code == 0 and [e["phase"] for e in seen["events"]] == ["inversion"]
    (run,) = runs(tmp_path)
    np.testing.assert_allclose(read_vectors(run / INVERSION), read_vectors(finished / INVERSION), atol=TOL)
    assert _state(run)["inversion"]["loss_end"] == pytest.approx(_state(finished)["inversion"]["loss_end"], abs=TOL)
    _same_candidates(run, finished, 0)  # the search started from the same vectors on both workers
    workers = {w["worker"]: w for w in json.loads(stdout.strip().splitlines()[-1])["workers"]}
    assert workers[seen["events"][0]["name"]]["restarts"] == 1


def _kill_all(find, out, stop: threading.Event, events: list) -> None:
    """Once the run has started, kill every worker process as soon as it is busy (rendering, or
    reloading its model after a restart), until ``stop``."""
    workers = find()
    _until(lambda: list(out.glob("*/state.json")), "the run folder")
    while not stop.is_set():
        for actor in workers:
            status = _ask(actor, 1)
            if status and status["busy"]:
                _kill(status, status["busy"], events)
        time.sleep(0.01)


def test_workers_killed_again_and_again_stop_the_run_resumable_within_the_worker_timeout(ray_cluster, tmp_path, capsys):
    """--worker-restarts 1: each worker's second death gives it up; with none left the run ends with
    exit 2 and one error line, well within --worker-timeout, marked interrupted."""
    stop = threading.Event()
    thread, seen = _beside(_kill_all, _workers(2), tmp_path, stop)
    argv = optimize_args(tmp_path, *ONE, "--workers", "2", "--worker-restarts", "1", "--worker-timeout", "60",
                         "--ray-address", ray_cluster.address)
    try:
        assert main(argv) == 2
        ended = time.monotonic()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert "error" not in seen, seen.get("error")
    kills = seen["events"]
    assert sorted(e["name"] for e in kills) == ["w0", "w0", "w1", "w1"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    (run,) = runs(tmp_path)
    assert len(err) == 1 and err[0].startswith("error: no Ray worker left") and err[0].endswith(
        f"embedpin optimize --resume {run}"), err
    state = _state(run)
    assert state["status"] == "interrupted" and state["generation"] == 0 and state["stop_reason"].startswith("error:")
    assert kills and ended - min(e["at"] for e in kills) < 60


def test_a_hung_last_worker_stops_the_run_resumable_with_one_error_line(ray_cluster, finished, tmp_path, capsys):
    """One worker, no restarts, joined through --ray-address: stopped (SIGSTOP) once it has started
    generation 0, it is caught by --worker-timeout; with no worker left the run ends with exit 2 and
    one error line, marked interrupted; --resume (in-process) then renders generation 0 as the
    in-process run did (validation off here: the search alone, to keep the test short)."""
    stopped = []

    def script(find, events):
        (worker,) = find()
        status = _busy_with(worker, "generation 0 [")
        os.kill(status["pid"], signal.SIGSTOP)
        stopped.append(status["pid"])

    thread, seen = _beside(script, _workers(1))
    argv = optimize_args(tmp_path, *ONE, "--workers", "1", "--worker-restarts", "0", "--worker-timeout", "3",
                         "--ray-address", ray_cluster.address)
    try:
        assert main(argv) == 2
    finally:
        thread.join(timeout=10)
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
    assert stopped, ("the worker was never seen busy", seen)
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


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out.append((p, Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()))
        except OSError:
            continue
        todo += children.get(p, [])
    return out


def test_a_killed_ray_agent_costs_the_local_cluster_a_restart_not_the_run(finished, tmp_path):
    """--workers 2 without an address starts embedpin's own local cluster (in a process of its own here).
    Its raylet fate-shares with Ray's agent processes: SIGKILL of ray::DashboardAgent while generation 0
    renders loses the node and both workers. The cluster is started again and the run ends with the
    in-process result."""
    out = tmp_path / "runs"
    argv = [a for a in optimize_args(out, *ONE, "--workers", "2") if a != "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "embedpin", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _until(lambda: list(out.glob("*/state.json")) or proc.poll() is not None, "the run folder")
        agent = _until(lambda: next((p for p, cmd in _descendants(proc.pid) if cmd.startswith("ray::DashboardAgent")),
                                    None), "Ray's dashboard agent")
        os.kill(agent, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "note: the local Ray node was lost" in err and err.count("is back (restart 1)") == 2, err
    (run,) = runs(out)
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
