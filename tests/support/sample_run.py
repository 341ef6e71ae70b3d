"""A synthetic run store in the exact on-disk format the run loop writes.

For the report's edge-case tests (hostile prompts, long runs, bad files) and benchmark, and
for previewing templates without a model: ``python tests/support/sample_run.py runs/demo`` writes a
small fake run and its report. What a real run's pages show is tested on a real run
(``test_reports.py``); this module is not part of the installed package.
Images are procedural shapes from the micro model's dataset; losses and CMA-ES
statistics are smooth made-up curves with seeded noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from embedpin.models.micro.dataset import batch as shapes_batch
from embedpin.store import generation_dirname, save_png, write_text

BLOCKS = {"guidance": 3, "token_weights": 4}


def toml_value(value) -> str:
    """A str / int / float / bool / list as a TOML value (strings as JSON-style basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def toml_text(tree: dict) -> str:
    """A two-level config dict as TOML text (top-level keys first, then ``[sections]``), laid
    out as ``embedpin.config.RunConfig.to_toml`` writes it."""
    lines = [f"{k} = {toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    for section, table in tree.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _png(path: Path, image: np.ndarray) -> str:
    save_png(path, image)
    return path.name


def _params(rng: np.random.Generator, scale: float) -> dict:
    return {name: (rng.standard_normal(n) * scale).round(5).tolist() for name, n in BLOCKS.items()}


def write_generation(root: Path, g: int, rng: np.random.Generator, population: int, batch: int,
                     depth: int, size: int, errmaps: bool) -> dict:
    """Write ``generations/NNNN/`` (images, error maps, generation.json); returns its history entry."""
    folder = root / "generations" / generation_dirname(g)
    sigma = 0.5 * 0.85 ** g
    image_losses = np.abs(0.6 * 0.9 ** g + 0.1 * rng.standard_normal((population, batch)))
    flip, clip = image_losses.mean(1) * 0.7, image_losses.mean(1) * 0.3
    losses = image_losses.mean(1) + image_losses.std(1)
    lineage = (np.arange(batch)[:, None] >> np.arange(depth)[::-1][None, :]) & 1  # [B, depth] branch bits
    pictures = shapes_batch(rng, population * batch)[0]
    if size != pictures.shape[-1]:
        pictures = np.repeat(np.repeat(pictures, size // pictures.shape[-1], 2), size // pictures.shape[-1], 3)
    pictures = pictures + 0.04 * rng.standard_normal(pictures.shape)  # sampler-like grain
    candidates = []
    for i in range(population):
        names = [f"images/{_png(folder / 'images' / f'c{i:02d}_i{j:02d}.png', pictures[i * batch + j])}"
                 for j in range(batch)]
        candidates.append(dict(
            index=i, loss=float(losses[i]), flip=float(flip[i]), clip=float(clip[i]),
            distance=float(abs(rng.standard_normal())), params=_params(rng, sigma),
            image_losses=image_losses[i].tolist(), images=names,
            lineage=np.concatenate([np.zeros((batch, 1), int), lineage], 1).tolist(),
            seeds=(1000 * g + 10 * i + np.arange(batch)).tolist()))
    best = int(np.argmin(losses))
    maps = []
    if errmaps:
        heat = np.stack([image_losses[best, :, None, None] * np.ones((batch, size, size))] * 3, 1)
        maps = [f"errmaps/{_png(folder / 'errmaps' / f'i{j:02d}.png', heat[j] * rng.random((3, size, size)))}"
                for j in range(batch)]
    record = dict(generation=g, sigma=sigma, candidates=candidates, best_candidate=best, errmaps=maps)
    write_text(folder / "generation.json", json.dumps(record))
    eig = np.sort(rng.random(sum(BLOCKS.values())) * 0.9 ** g + 1e-3)[::-1]
    return dict(generation=g, best=float(losses.min()), median=float(np.median(losses)), worst=float(losses.max()),
                sigma=sigma, axis_ratio=float(np.sqrt(eig.max() / eig.min())), eigenvalues=eig.tolist(),
                flip=float(flip[best]), clip=float(clip[best]), best_candidate=best,
                best_params=candidates[best]["params"], seconds=1.5, renders=population * batch)


def write_state(root: Path, status: str, history: list[dict], pareto: bool, rng: np.random.Generator) -> None:
    """Write ``state.json`` for ``history`` (best so far, optional Pareto front)."""
    best_g = min(range(len(history)), key=lambda g: history[g]["best"]) if history else None
    best = None if best_g is None else dict(
        generation=best_g, candidate=history[best_g]["best_candidate"], loss=history[best_g]["best"],
        params=history[best_g]["best_params"])
    front = []
    if pareto and history:
        d = np.sort(rng.random(6))
        front = [dict(loss=float(0.5 - 0.4 * x), distance=float(x), generation=int(rng.integers(len(history))),
                      candidate=int(rng.integers(4))) for x in d]
    state = dict(version=1, status=status, generation=len(history), best=best, history=history,
                 pareto=front, optimizer={"kind": "sample"})
    write_text(root / "state.json", json.dumps(state))


def write_sample_run(root: str | Path, generations: int = 3, population: int = 4, batch: int = 4,
                     depth: int = 2, size: int = 64, status: str = "running", prompt: str = "a red circle",
                     seed: int = 0, targets: bool = True, pareto: bool = True, errmaps: bool = True) -> Path:
    """Write a complete fake run folder (config, state, targets, generations); returns it."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    config = dict(out=str(root.parent), model=dict(name="micro", device="cpu"),
                  prompt=dict(prompt=prompt, negative="blurry", guide=["guide_00.png"] if targets else []),
                  search=dict(blocks=list(BLOCKS), rank=8), render=dict(batch=batch, steps=20, size=size),
                  optim=dict(population=population, sigma0=0.5, seed=seed))
    write_text(root / "config.toml", toml_text(config))
    if targets:
        pictures = shapes_batch(rng, 2)[0]
        _png(root / "targets" / "target_00.png", pictures[0])
        _png(root / "targets" / "guide_00.png", pictures[1])
    history = [write_generation(root, g, rng, population, batch, depth, size, errmaps) for g in range(generations)]
    write_state(root, status, history, pareto, rng)
    return root


if __name__ == "__main__":
    from embedpin.reports.builder import rebuild

    print(rebuild(write_sample_run(sys.argv[1] if len(sys.argv) > 1 else "runs/sample")))
