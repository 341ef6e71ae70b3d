"""Cost of building λ candidates' conditionings vs rendering them (goal: < 5%).

Rows: the micro model (SD 1.x family) and a tiny random-weight SDXL (two text encoders,
token vectors in both, guidance on the first encoder's part, pooled embeddings and size
ids in every UNet call) at its own size; build time includes the distances.

Both paths run in one process on the same model: ``guidance.build`` for 64 candidates with
every block searched (FlexDiffuse scalars, concept, token weights, delta, token vectors,
which re-run the text encoder), and the rendering those candidates need: 64 x 8 images x
20 steps of UNet calls with classifier-free guidance (cond + uncond in one batch), plus
the VAE decode, by ``embedpin.render.sampler.render`` (hyperbatch, as a run renders; the
cheaper rendering makes the ratio the stricter one).

Uses the trained micro model when ``embedpin.models.loader.load_components("micro")``
works, else an untrained stand-in of the same architecture (same cost) with a warning.

    python benchmarks/guidance.py [--candidates 64 --images 8 --steps 20 --plain]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from embedpin.guidance import GuidanceOptions, build, make_context
from embedpin.models.micro.dataset import batch
from embedpin.render.sampler import RenderPlan, render

BLOCKS = {"guidance", "cfg", "token_weights", "delta", "token_vectors"}


def load_model():
    try:
        from embedpin.models.loader import load_components

        return load_components("micro")
    except Exception as e:  # noqa: BLE001 - any failure means: no trained model here yet
        from embedpin.models.micro.arch import random_components

        warnings.warn(f"trained micro model unavailable ({e.__class__.__name__}: {e}); "
                      "timing an untrained stand-in of the same architecture", stacklevel=1)
        return random_components(scale=1.0)


def random_params(blocks, lam: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform candidates inside every block's bounds."""
    return {b.name: b.lower + (b.upper - b.lower) * torch.rand(lam, b.size, generator=gen) for b in blocks}


def time_build(ctx, params, repeats: int, after=lambda cond: None) -> float:
    after(build(ctx, params))  # first call computes the lazy bases (once per run)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        after(build(ctx, params))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_render(comps, cond, images: int, steps: int, hyperbatch: bool) -> tuple[float, int]:
    """Seconds and UNet image-evaluations to render ``images`` per candidate (the run's sampler)."""
    size = comps.default_size
    plan = RenderPlan(batch=images, steps=steps, scheduler="ddim", hyperbatch=hyperbatch, height=size, width=size)
    t = time.perf_counter()
    result = render(comps, cond.prompt_embeds, cond.negative_embeds, cond.cfg, plan, **cond.pooled())
    return time.perf_counter() - t, result.unet_evals


def sdxl_model():
    """The tests' tiny random-weight SDXL (two encoders, pooled, size ids) with a tower of the
    first encoder's width, built from configs (``tests/support/sdxl_model.py``)."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.sdxl_model import W1, save_sdxl_folder

    from embedpin.models.loader import load_components

    return load_components(str(save_sdxl_folder(Path(tempfile.mkdtemp()) / "tiny-sdxl", tower=W1)))


def measure(comps, args, label: str) -> tuple[float, float]:
    """(build ÷ render, build without token vectors ÷ render) for one model; prints its row."""
    from embedpin.guidance.build import distance

    size = comps.default_size
    imgs, captions, _ = batch(np.random.default_rng(0), 2)
    guide = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(imgs[:1])), size=(size, size))
    ctx = make_context(comps, captions[1], guide=guide, concepts=captions[0].split()[2],
                       options=GuidanceOptions(n_vectors=2, vector_k=8, delta_k=8))
    blocks = ctx.blocks(BLOCKS)
    gen = torch.Generator().manual_seed(0)
    params = random_params(blocks, args.candidates, gen)
    no_vectors = {k: v for k, v in params.items() if k != "token_vectors"}

    build_s = time_build(ctx, params, args.repeats, lambda c: distance(ctx, c))
    build_nv_s = time_build(ctx, no_vectors, args.repeats, lambda c: distance(ctx, c))
    render_s, evals = time_render(comps, build(ctx, params), args.images, args.steps, not args.plain)
    print(f"{label}: {comps.family} {size}px ({comps.source or 'trained'}); blocks: {', '.join(b.name for b in blocks)}")
    print(f"  build + distance of {args.candidates} candidates: {build_s * 1e3:.1f} ms (without token vectors "
          f"{build_nv_s * 1e3:.1f} ms)")
    print(f"  render {args.candidates} x {args.images} images x {args.steps} steps (CFG, "
          f"{'plain' if args.plain else 'hyperbatch'}): {render_s:.1f} s, {evals} UNet image-evaluations")
    return build_s / render_s, build_nv_s / render_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="render plain batches instead of hyperbatches")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    micro = measure(load_model(), args, "micro")
    sdxl = measure(sdxl_model(), args, "tiny SDXL")
    print(f"build_over_render: {micro[0]:.5f}")
    print(f"build_over_render_without_token_vectors: {micro[1]:.5f}")
    print(f"sdxl_build_over_render: {sdxl[0]:.5f}")
    print(f"sdxl_build_over_render_without_token_vectors: {sdxl[1]:.5f}")
    print(f"goal_below_5_percent: {'yes' if max(micro[0], sdxl[0]) < 0.05 else 'no'}")


if __name__ == "__main__":
    main()
