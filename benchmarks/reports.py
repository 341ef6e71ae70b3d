"""Cost of writing one generation's report vs rendering that generation on the micro model.

One run, side by side: render λ candidates × B images × steps (CFG on) with the
project's hyperbatch sampler, write that generation into a run store in the exact
on-disk format, and time ``embedpin.reports.builder.update`` for it (thumbnails of
the new renders, histogram, animation frame, its page, the previous page, the run
page's plots and GIF) after a short and a long history. Goal: report < 10% of render.

    python benchmarks/reports.py [--candidates 8] [--batch 8] [--steps 20] [--history 10 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic run store (sample_run)


class Timer:
    """Wall-clock and process CPU seconds of a ``with`` block (CPU time is robust to a loaded
    machine; wall time is what a user waits)."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def load_model():
    """The trained micro model if its weights are there, else the untrained one of the same size."""
    try:
        from embedpin.models.loader import load_components

        return load_components("micro"), "micro (trained)"
    except Exception as e:  # noqa: BLE001 - weights missing or loader absent: same architecture, random
        from embedpin.models.micro.arch import random_components

        return random_components(seed=0, scale=1.0), f"random_components(scale=1.0) ({type(e).__name__})"


def conditionings(components, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """λ slightly perturbed encodings of one prompt [λ, L, D] and the empty prompt [1, L, D]."""
    from embedpin.guidance.encode import encode_prompt

    cond = encode_prompt(components, "a red circle in the center").hidden
    cond = cond + 0.05 * torch.randn((n, *cond.shape[1:]), generator=gen)
    return cond, encode_prompt(components, "").hidden


def render_generation(components, n: int, batch: int, steps: int) -> tuple[dict, float, str]:
    """Render one generation; returns (images [λ, B, 3, H, W], lineage, seeds), seconds, method."""
    cond, negative = conditionings(components, n, torch.Generator().manual_seed(0))
    try:
        from embedpin.render.sampler import RenderPlan, render
    except ImportError:
        return unet_only(components, cond, negative, batch, steps)
    plan = RenderPlan(batch=batch, steps=steps, height=64, width=64, seed=0)
    with Timer() as timer:
        result = render(components, cond, negative, 5.0, plan)
    out = dict(images=result.images, lineage=result.lineage.tolist(), seeds=result.seeds.tolist())
    return out, timer, f"embedpin.render.sampler.render (hyperbatch, {result.unet_evals} UNet image-evals)"


@torch.no_grad()
def unet_only(components, cond, negative, batch: int, steps: int) -> tuple[dict, float, str]:
    """Fallback: time the UNet calls of λ × B latents × steps with CFG (no sampler, no VAE)."""
    n, gen = len(cond), torch.Generator().manual_seed(0)
    x = torch.randn((n * batch, 4, 16, 16), generator=gen)
    text = torch.cat([negative.expand(n * batch, -1, -1), cond.repeat_interleave(batch, 0)])
    with Timer() as timer:
        for t in torch.linspace(999, 0, steps).long():
            eps = components.unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
            x = x - 0.01 * eps[: n * batch]
    images = torch.rand((n, batch, 3, 64, 64), generator=gen)
    lineage = [[0] for _ in range(batch)]
    return dict(images=images, lineage=lineage, seeds=[[j] for j in range(batch)]), timer, \
        "UNet calls only (embedpin.render.sampler missing)"


def store_with_history(root: Path, history: int) -> Path:
    """A run store with ``history`` small old generations whose report assets the run page
    needs (animation frames, the last generation's page) are already written."""
    from support.sample_run import write_sample_run

    from embedpin.reports.builder import write_generation, write_run
    from embedpin.store import load_run

    write_sample_run(root, generations=history, population=2, batch=2, depth=1, status="running")
    run = load_run(root)
    write_run(run)
    write_generation(run, history - 1)
    return root


def add_generation(root: Path, rendered: dict) -> int:
    """Write the rendered generation after the history, as the run loop would; returns its number."""
    from PIL import Image
    from support.sample_run import write_state

    from embedpin.store import save_image, write_text

    state = json.loads((root / "state.json").read_text())
    g = state["generation"]
    folder = root / "generations" / f"{g:04d}"
    images = (rendered["images"].clamp(0, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    rng = np.random.default_rng(g)
    losses = rng.random(images.shape[:2])
    candidates = []
    for i, row in enumerate(images):
        names = [f"images/c{i:02d}_i{j:02d}.png" for j in range(len(row))]
        for name, pixels in zip(names, row):
            save_image(folder / name, Image.fromarray(pixels))
        candidates.append(dict(index=i, loss=float(losses[i].mean()), flip=float(losses[i].mean()), clip=None,
                               distance=float(rng.random()), params={"delta": rng.standard_normal(8).tolist()},
                               image_losses=losses[i].tolist(), images=names, lineage=rendered["lineage"],
                               seeds=[s[-1] for s in rendered["seeds"]]))
    best = int(np.argmin(losses.mean(1)))
    record = dict(generation=g, sigma=0.3, candidates=candidates, best_candidate=best, errmaps=[])
    write_text(folder / "generation.json", json.dumps(record))
    entry = dict(state["history"][-1], generation=g, best_candidate=best)
    write_state(root, "running", state["history"] + [entry], pareto=True, rng=rng)
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--history", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    from embedpin.reports.builder import update

    components, model = load_model()
    torch.set_grad_enabled(False)
    rendered, render, method = render_generation(components, args.candidates, args.batch, args.steps)
    print(f"model: {model}; render: {method}; torch threads: {torch.get_num_threads()}")
    print(f"render of {args.candidates} candidates x {args.batch} images x {args.steps} steps: "
          f"{render.wall:.2f} s wall, {render.cpu:.2f} s CPU")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for history in args.history:
            root = store_with_history(Path(tmp) / "runs" / f"{history:04d}-bench", history)
            g = add_generation(root, rendered)
            with Timer() as report:
                update(root, g)
            print(f"report of generation {g} (after {history} generations): {report.wall:.2f} s wall, "
                  f"{report.cpu:.2f} s CPU")
            ratios[history] = (report.wall / render.wall, report.cpu / render.cpu)
    for history, (wall, cpu) in ratios.items():
        print(f"report_over_render_wall_after_{history}_generations: {wall:.3f}")
        print(f"report_over_render_cpu_after_{history}_generations: {cpu:.3f}")
    worst = max(max(r) for r in ratios.values())
    print(f"goal_report_below_10pct_of_render: {'yes' if worst < 0.10 else 'no'}")


if __name__ == "__main__":
    main()
