"""Behaviour unchanged: the same seed gives the same run folder before and after a change.

Runs five small runs through the CLI (``python -m embedpin``), each into ``OUT/<name>``:

- ``default``: the defaults (inversion stage, then CMA-ES on the token vectors), shortened;
- ``guided``: image guidance and the conditioning delta beside the vectors;
- ``masked``: a ``--mask`` that ignores the target's right half;
- ``sdxl``: a tiny random-weight SDXL pipeline (two text encoders) saved as a diffusers folder;
- ``ray``: the default run on two Ray workers (``--workers 2``);

and writes ``OUT/digests.json``: a SHA-256 per file of each run folder, with the wall clocks
taken out (each generation's and the inversion stage's ``seconds``, the Ray workers' seconds)
and the folder's own path replaced by ``<out>`` (also in the pinned files' metadata). The
report's HTML, plots and animation are
left out (they show the clocks); everything they are drawn from is in.

    python benchmarks/same_runs.py OUT               # run, write OUT/digests.json
    python benchmarks/same_runs.py --compare A.json B.json

``--compare`` prints each file that differs and, last, ``runs_identical: k/n`` and
``files_compared: N``. Compare digests made at the same thread count (``OMP_NUM_THREADS``): CPU
kernels sum in another order on more threads, which moves the last bits of the renders. Run it
from the tree under test (``PYTHONPATH=<tree>``); the input
images are copied into ``OUT`` so two trees see the same paths when OUT is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--inversion-steps", "6", "--generations", "2", "--population", "4", "--batch", "4", "--steps", "6",
         "--validation-seeds", "4", "--seed", "3", "--quiet"]
CLOCKS = {"seconds", "workers"}
RUNS = ("default", "guided", "masked", "sdxl", "ray")
SKIPPED = (".html", ".svg", ".gif", ".js", ".css")


def _inputs(out: Path) -> tuple[str, str]:
    """The target and a mask (white left half = pin) copied / drawn into ``out/inputs``."""
    from PIL import Image

    folder = out / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    star = folder / "star.png"
    shutil.copy(ROOT / "examples" / "star.png", star)
    w, h = Image.open(star).size
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (0, 0, w // 2, h))
    mask.save(folder / "mask.png")
    return str(star), str(folder / "mask.png")


def _sdxl_folder(out: Path) -> str:
    """The tests' tiny SDXL pipeline, saved once as a diffusers folder."""
    folder = out / "inputs" / "sdxl"
    if not folder.exists():
        for helpers in (ROOT / "tests" / "support", ROOT / "tests"):
            sys.path.insert(0, str(helpers))
        from support.sdxl_model import build_sdxl_pipeline

        build_sdxl_pipeline().save_pretrained(folder)
    return str(folder)


def runs(out: Path) -> dict[str, list[str]]:
    star, mask = _inputs(out)
    base = ["optimize", "--target", star, "--prompt", "a star", *SMALL]
    return {
        "default": base,
        "guided": [*base, "--blocks", "guidance,delta,token_vectors"],
        "masked": [*base, "--mask", mask],
        "sdxl": [*base, "--model", _sdxl_folder(out), "--size", "32"],
        "ray": [*base, "--workers", "2"],
    }


def _timeless(obj):
    """JSON without its wall clocks, at any depth."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in CLOCKS}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def digest_folder(folder: Path, out: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(SKIPPED)):
        data = path.read_bytes()
        if path.suffix == ".safetensors":  # the recipe in its metadata names the input paths
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n].decode().replace(str(out), "<out>"))
            data = json.dumps(header, sort_keys=True).encode() + data[8 + n:]
        if path.suffix in (".json", ".toml"):
            text = data.decode().replace(str(out), "<out>")
            if path.suffix == ".json":
                text = json.dumps(_timeless(json.loads(text)), sort_keys=True)
            data = text.encode()
        if "plot" in path.name or path.parent.name == "plots":
            continue
        digests[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return digests


def run_all(out: Path, only: list[str] | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    result = {}
    for name, argv in runs(out).items():
        if only and name not in only:
            continue
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "embedpin", *argv, "--out", str(target)], check=True, env=env)
        (folder,) = [p for p in target.iterdir() if p.is_dir() and not p.name.startswith(".")]
        result[name] = digest_folder(folder, out)
        print(f"{name}: {len(result[name])} files", flush=True)
    return result


def redigest(out: Path) -> dict:
    """The digests of the run folders already in ``out`` (after a change to what is digested)."""
    folders = {name: [p for p in (out / name).iterdir() if p.is_dir() and not p.name.startswith(".")]
               for name in RUNS if (out / name).is_dir()}
    return {name: digest_folder(folder, out) for name, (folder,) in folders.items()}


def compare(a: dict, b: dict) -> None:
    same, files = 0, 0
    for name in sorted(set(a) | set(b)):
        da, db = a.get(name, {}), b.get(name, {})
        differ = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        files += len(set(da) | set(db))
        for k in differ:
            print(f"{name}: differs: {k} ({'missing in one' if k not in da or k not in db else 'content'})")
        same += not differ
    print(f"runs_identical: {same}/{len(set(a) | set(b))}")
    print(f"files_compared: {files}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--only", action="append")
    p.add_argument("--compare", nargs=2, metavar="JSON")
    p.add_argument("--redigest", action="store_true", help="digest OUT's run folders again without running")
    a = p.parse_args()
    if a.compare:
        compare(*(json.loads(Path(f).read_text()) for f in a.compare))
        return
    out = Path(a.out).resolve()
    result = redigest(out) if a.redigest else run_all(out, a.only)
    (out / "digests.json").write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
