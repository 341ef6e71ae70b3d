"""Hyperbatch vs plain batches, side by side in one run, on the micro model.

- cost: counted UNet image-evaluations hyperbatch / plain, 20 steps, at B=8 (goal <= 0.5)
  and B=64 (goal <= 0.3);
- wall time of the same renders, as a ratio (goal: within 15 % of the evaluation ratio);
  the VAE decode costs both modes the same, so the ratio of sampling time alone
  (render minus a timed decode of as many latents) is printed too;
- diversity per scheduler: mean pairwise ꟻLIP among a hyperbatch's B images as a
  fraction of the same among B independent seeds (goal >= 0.6);
- quality per scheduler: the share of hyperbatch images whose foreground colour is the
  caption's (the micro model's procedural check) over the same share for independent seeds
  (~1: siblings are as good as independent samples; a biased re-noise lowers it).

Uses the trained micro model when ``load_components("micro")`` works, else an untrained
stand-in (printed warning: its images, and so the diversity figures, mean little).

    python benchmarks/hyperbatch.py [--candidates 4] [--seeds 6] [--renoise ETA] [--quick]
    python benchmarks/hyperbatch.py --arch sd15 --device cuda --dtype float16   # cost only, native size

With ``--arch`` (``sd15`` or ``sdxl``: the published architectures with random weights, from
``benchmarks/real_scale.py``) only the cost figures are measured, at the model's native size:
random weights render nothing to compare the diversity of.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from embedpin.guidance.encode import encode_prompt
from embedpin.models.micro.dataset import colour_right as scene_colour_right
from embedpin.models.micro.dataset import random_scene
from embedpin.render.latents import decode
from embedpin.render.sampler import RenderPlan, plain, render

SCHEDULERS = ("euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "dpm++sde", "unipc", "heun", "lms")


def load():
    try:
        from embedpin.models.loader import load_components

        return load_components("micro"), "trained micro"
    except Exception as e:  # noqa: BLE001 - any failure means: no trained model here
        from embedpin.models.micro.arch import random_components

        print(f"WARNING: trained micro model unavailable ({type(e).__name__}: {e}); "
              "using random_components(scale=1.0): costs and times are meaningful, diversity is not")
        return random_components(scale=1.0), "untrained micro (random_components)"


def scenes(n: int) -> list:
    """n one-shape scenes of the micro dataset (their captions condition the renders)."""
    rng = np.random.default_rng(0)
    return [random_scene(rng, p_two=0.0) for _ in range(n)]


def conditioning(comp, scenes_: list):
    """The scenes' captions encoded: cond [n, 77, D], negative [1, 77, D], cfg [n], captions."""
    captions = [s.caption for s in scenes_]
    cond = torch.cat([encode_prompt(comp, c).hidden for c in captions])
    return cond, encode_prompt(comp, "").hidden, torch.full((len(captions),), 5.0), captions


def colour_right(images: torch.Tensor, scenes_: list) -> float:
    """Share of images [λ, B, 3, H, W] whose foreground has their scene's colour."""
    im = images.permute(0, 1, 3, 4, 2).cpu().numpy()
    return float(np.mean([scene_colour_right(im[i, b], s) for i, s in enumerate(scenes_) for b in range(im.shape[1])]))


def pair_mean(images: torch.Tensor, metric) -> float:
    """Mean over candidates of the mean pairwise distance among each candidate's B images."""
    d = metric(images)  # [λ, B, B], zero diagonal
    b = d.shape[-1]
    return float(d.sum((-1, -2)).mean() / (b * (b - 1)))


def flip_metric():
    try:
        from embedpin.scoring.flip import pairwise_flip

        return pairwise_flip, "ꟻLIP (embedpin.scoring.flip)"
    except ImportError:
        def mad(images):
            return (images.unsqueeze(-4) - images.unsqueeze(-5)).abs().mean((-1, -2, -3))

        return mad, "mean absolute difference (ꟻLIP module not available yet)"


def timed_render(comp, cond, neg, cfg, plan):
    if comp.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = render(comp, cond, neg, cfg, plan, **POOLED)
    if comp.device.type == "cuda":
        torch.cuda.synchronize()
    return r, time.perf_counter() - t


POOLED: dict = {}  # SDXL: the pooled embeddings every render of the run takes


def decode_time(comp, n: int, plan: RenderPlan) -> float:
    f = comp.vae_scale_factor
    z = torch.zeros(n, comp.latent_channels, plan.height // f, plan.width // f, device=comp.device)
    t = time.perf_counter()
    with torch.no_grad():
        decode(comp.vae, z, plan.max_batch)
    if comp.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def cost(comp, cond, neg, cfg, batch: int, steps: int, scheduler: str, repeats: int, size: int = 64,
         max_batch: int = 256) -> dict[str, float]:
    """Evaluation and wall-time ratios of hyperbatch vs plain renders, interleaved, best of
    ``repeats`` each (the machine may be shared)."""
    plan = RenderPlan(batch=batch, steps=steps, scheduler=scheduler, seed=0, height=size, width=size,
                      max_batch=max_batch)
    timed_render(comp, cond, neg, cfg, replace(plan, batch=2, steps=2))  # warm-up
    tp = th = float("inf")
    for _ in range(repeats):
        p, t = timed_render(comp, cond, neg, cfg, plain(plan))
        tp = min(tp, t)
        h, t = timed_render(comp, cond, neg, cfg, plan)
        th = min(th, t)
    td = min(decode_time(comp, len(cond) * batch, plan) for _ in range(repeats))
    evals = h.unet_evals / p.unet_evals
    print(f"B={batch:3d} {steps} steps {scheduler}: evals {h.unet_evals} / {p.unet_evals}, "
          f"wall {th:.1f}s / {tp:.1f}s (decode {td:.1f}s)")
    return {"evals": evals, "wall": th / tp, "sampling": max(th - td, 1e-9) / max(tp - td, 1e-9)}


def diversity(comp, cond, neg, cfg, scenes_, scheduler: str, seeds: int, steps: int, metric,
              renoise=None) -> tuple[float, float]:
    """(hyperbatch / plain pairwise distance, hyperbatch / plain colour-right share), B=8,
    summed over seeds."""
    hyper = indep = ok_h = ok_p = 0.0
    for seed in range(seeds):
        plan = RenderPlan(batch=8, steps=steps, scheduler=scheduler, seed=seed, renoise=renoise)
        h, p = render(comp, cond, neg, cfg, plan).images, render(comp, cond, neg, cfg, plain(plan)).images
        hyper, indep = hyper + pair_mean(h, metric), indep + pair_mean(p, metric)
        ok_h, ok_p = ok_h + colour_right(h, scenes_), ok_p + colour_right(p, scenes_)
    return hyper / indep, ok_h / max(ok_p, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4, help="λ candidates rendered together")
    ap.add_argument("--seeds", type=int, default=6,
                    help="seeds per scheduler for the diversity figure (each adds one root pair per candidate)")
    ap.add_argument("--repeats", type=int, default=2, help="timed renders per mode (best is kept)")
    ap.add_argument("--renoise", type=float, default=None,
                    help="branch re-noise eta for deterministic samplers (default: the renderer's, 1)")
    ap.add_argument("--quick", action="store_true", help="2 candidates (1 at B=64), 1 seed, 3 schedulers")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default=None,
                    help="cost only, on a published architecture with random weights, at its native size")
    ap.add_argument("--size", type=int, default=None, help="with --arch: render size (default: native)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.arch:
        return arch_cost(args)
    if args.quick:
        args.candidates, args.seeds, args.repeats = 2, 1, 1
    torch.manual_seed(0)  # benchmark script only: any unseeded op stays reproducible
    comp, what = load()
    scenes_ = scenes(args.candidates)
    cond, neg, cfg, captions = conditioning(comp, scenes_)
    metric, metric_name = flip_metric()
    print(f"model: {what}; {args.candidates} candidates: {captions}")
    print(f"diversity metric: {metric_name}")

    c8 = cost(comp, cond, neg, cfg, 8, 20, "dpm++2m", args.repeats)
    schedulers = ("euler-a", "dpm++2m", "unipc") if args.quick else SCHEDULERS
    div, quality = {}, {}
    for name in schedulers:
        t = time.perf_counter()
        div[name], quality[name] = diversity(comp, cond, neg, cfg, scenes_, name, args.seeds, 20, metric,
                                             args.renoise)
        print(f"diversity {name}: {div[name]:.3f}, colour-right ratio {quality[name]:.3f} "
              f"({time.perf_counter() - t:.0f}s)")
    n64 = 1 if args.quick else len(cond)
    c64 = cost(comp, cond[:n64], neg, cfg[:n64], 64, 20, "dpm++2m", args.repeats)

    for tag, c in (("b8", c8), ("b64", c64)):
        print(f"evals_ratio_{tag}: {c['evals']:.3f}")
        print(f"wall_ratio_{tag}: {c['wall']:.3f}")
        print(f"sampling_wall_ratio_{tag}: {c['sampling']:.3f}")
        print(f"wall_over_evals_{tag}: {c['wall'] / c['evals']:.3f}")
    for name, v in div.items():
        print(f"diversity_{name}: {v:.3f}")
    print(f"diversity_min: {min(div.values()):.3f}")
    print(f"colour_right_ratio_min: {min(quality.values()):.3f}")


def arch_cost(args) -> None:
    """The cost figures on SD 1.5's or SDXL's architecture (random weights) at its native size."""
    from real_scale import build

    from embedpin.guidance.encode import encode_negative
    from embedpin.render.memory import probe_max_batch

    comp = build(args.arch).to(args.device, getattr(torch, args.dtype))
    size = args.size or comp.default_size
    enc, neg = encode_prompt(comp, "a large red star at the top left"), encode_negative(comp, "")
    n = 1 if args.quick else args.candidates
    cond, cfg = enc.hidden.expand(n, -1, -1), torch.full((n,), 5.0)
    if comp.is_sdxl:
        POOLED.update(pooled=enc.pooled.expand(n, -1), negative_pooled=neg.pooled)
    max_batch = probe_max_batch(comp, size, size)
    print(f"model: random {args.arch} ({args.dtype}, {args.device}) at {size}², max batch {max_batch}")
    c8 = cost(comp, cond, neg.hidden, cfg, 8, 20, "dpm++2m", args.repeats, size, max_batch)
    for k, v in c8.items():
        print(f"{args.arch}_{k}_ratio_b8: {v:.3f}")


if __name__ == "__main__":
    main()
