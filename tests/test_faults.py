"""Faults a user meets mid-run, through the CLI: the run folder's disk fills up, the folder turns
read-only, a target file is replaced before ``--resume`` (refused, as ``analyze`` refuses it). Each
stops with one ``error:`` line (exit 2), loses nothing committed, leaves nothing ``--resume`` trips
on, and the resumed run ends exactly as the uninterrupted one (``finished``, conftest).

The run folder lives on a small tmpfs mounted for the test (root only; skipped elsewhere): the disk
is filled, and remounted read-only, for real.
"""

import hashlib
import json
import shutil
import subprocess
import threading
import time

import pytest
from support.micro_run import PROMPT, SMALL, STAR, timeless_state
from support.micro_run import runs as _runs

from embedpin.cli import main


@pytest.fixture
def disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk (unmounted afterwards)."""
    path = tmp_path / "disk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"a real full / read-only disk needs a tmpfs mount (root): {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _committed(run) -> dict:
    """SHA-256 of every file of the run's committed part: its inputs record, targets, the plain
    prompt's validation and the generations state.json names."""
    done = json.loads((run / "state.json").read_text())["generation"]
    files = [p for p in run.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    keep = [p for p in files if p.parent.name in ("targets", "validation") and p.parent.parent == run
            or p.name in ("config.toml", "inputs.json")
            or "generations" in p.parts and p.relative_to(run / "generations").parts[0].isdigit()
            and int(p.relative_to(run / "generations").parts[0]) < done]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in keep}


def _lost(before: dict, run) -> list[str]:
    """Files of ``before`` that are gone or changed."""
    now = {p: hashlib.sha256((run / p).read_bytes()).hexdigest() for p in before if (run / p).is_file()}
    return [p for p in before if now.get(p) != before[p]]


def _when(pattern: str, out, act) -> threading.Thread:
    """Run ``act(run folder)`` once a path matching ``pattern`` exists under ``out`` (the fault's moment)."""
    def watch():
        t = time.monotonic()
        while not (found := list(out.glob(pattern))) and time.monotonic() - t < 300:
            time.sleep(0.005)
        act(found[0].parents[2])
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _fill(disk, seen: dict):
    def act(run):
        seen["committed"] = _committed(run)
        with open(disk / ".filler", "wb") as f:  # until the disk is full
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
    return act


def _read_only(disk, seen: dict):
    def act(run):
        seen["committed"] = _committed(run)
        while subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode:
            time.sleep(0.01)  # (busy while a file is open for writing)
    return act


def _one_error_line(capsys, run, *words) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    assert err[0].endswith(f"embedpin optimize --resume {run}") or "--resume" not in words
    return err[0]



def test_a_full_then_read_only_run_folder_and_a_replaced_target(finished, disk, tmp_path, capsys):
    target = shutil.copy(STAR, tmp_path / "star.png")
    argv = ["optimize", "--target", str(target), "--prompt", PROMPT, "--out", str(disk), *SMALL]

    seen: dict = {}  # 1. the disk fills up once generation 1 has begun writing
    fault = _when("*/generations/.0001.tmp/images", disk, _fill(disk, seen))
    assert main(argv) == 2
    fault.join(timeout=10)
    (run,) = _runs(disk)
    _one_error_line(capsys, run, "cannot write the run folder", "No space left on device", "--resume")
    assert json.loads((run / "state.json").read_text())["generation"] == 1 and _lost(seen["committed"], run) == []

    shutil.copy(STAR.replace("star", "circle"), target)  # 2. a target replaced: refused, the run untouched
    for command in (["optimize", "--resume", str(run), "--quiet"], ["analyze", str(run)]):
        assert main(command) == 2
        _one_error_line(capsys, run, f"the run's input {target} has changed since the run started")
    assert _lost(seen["committed"], run) == []
    shutil.copy(STAR, target)

    (disk / ".filler").unlink()  # 3. space again; the folder turns read-only once generation 2 has begun
    fault = _when("*/generations/.0002.tmp/images", disk, _read_only(disk, seen))
    try:
        assert main(["optimize", "--resume", str(run), "--quiet"]) == 2
        fault.join(timeout=10)
        _one_error_line(capsys, run, "cannot write the run folder", "Read-only file system", "--resume")
    finally:
        fault.join(timeout=60)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert json.loads((run / "state.json").read_text())["generation"] == 2 and _lost(seen["committed"], run) == []

    assert main(["optimize", "--resume", str(run), "--quiet"]) == 0  # 4. ends as the uninterrupted run
    assert timeless_state(run / "state.json") == timeless_state(finished / "state.json")
    for g in range(3):
        rel = f"generations/{g:04d}/generation.json"
        assert (run / rel).read_bytes() == (finished / rel).read_bytes(), rel
    assert not list(run.rglob(".*.tmp")) and not list((run / "generations").glob(".*"))
