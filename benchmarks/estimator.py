"""Does the search's loss estimate what a user sees? Hyperbatch vs plain renders of one conditioning.

For each conditioning (the plain prompt, a pinned result, the target's own caption), on
the same ``--seeds`` render seeds (>= 64 batches' worth of images): the run's loss
(mean + w·std per batch of B, ``scoring.aggregate`` with each image's root) of
hyperbatch renders and of plain batches (what users render), and the mean per-image ꟻLIP.
Seeds are matched: a hyperbatch and a plain batch of the same seed share their roots'
images exactly, so the per-seed differences isolate what branching changes; the standard
error printed is that of the mean paired difference. Goal: the ratios within 3 %.

The pinned result is a short default run (``--generations``) of PROMPT against a target
the model drew from CAPTION (or ``--pinned RUN_DIR``).

    python benchmarks/estimator.py [--seeds 32] [--roots 2] [--renoise ETA] [--pinned RUN_DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

PROMPT = "a star"
CAPTION = "a large red star at the top left on a plain blue background"


def target_image(comp, folder: str) -> str:
    """The model's render of CAPTION (plain, seed 4242, the run's settings) as a PNG."""
    from embedpin.config import RunConfig
    from embedpin.evaluation.session import for_model, render_plan
    from embedpin.guidance.encode import encode_prompt
    from embedpin.render.sampler import render
    from embedpin.store import save_png

    cfg = for_model(RunConfig(), comp, None)
    plan = replace(render_plan(cfg), batch=1, hyperbatch=False, seed=4242)
    img = render(comp, encode_prompt(comp, CAPTION).hidden, encode_prompt(comp, "").hidden, cfg.render.cfg,
                 plan).images[0, 0]
    path = os.path.join(folder, "target.png")
    save_png(path, img)
    return path


def pinned_run(target: str, folder: str, generations: int) -> str:
    from embedpin.config import RunConfig
    from embedpin.runner import run

    cfg = RunConfig()
    cfg.prompt.prompt, cfg.score.targets, cfg.out = PROMPT, [target], folder
    cfg.optim.generations = generations
    return str(run(cfg.validate()).run_dir)


def losses(session, conds, neg, cfg, plan, seeds: int):
    """Per seed: run loss [seeds, k] and mean ꟻLIP [seeds, k] of k conditionings [k, L, D]."""
    from embedpin.render.sampler import render

    loss, flip = [], []
    for s in range(seeds):
        out = render(session.components, conds, neg, cfg, replace(plan, seed=10_000 + s))
        score = session.scorer(out.images, out.lineage, out.roots)
        loss.append(score.loss.double())
        flip.append(score.flip.double())
    return torch.stack(loss).numpy(), torch.stack(flip).numpy()


def main() -> None:
    from embedpin.config import RunConfig
    from embedpin.evaluation.session import Session
    from embedpin.exports import load_pinned
    from embedpin.guidance.encode import encode_prompt
    from embedpin.models.loader import load_components

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=32, help="batches of B per mode (x B = images per figure)")
    ap.add_argument("--roots", type=int, default=None, help="hyperbatch roots (default: the run's)")
    ap.add_argument("--renoise", type=float, default=None, help="branch re-noise eta (default: the run's)")
    ap.add_argument("--pinned", default=None, help="a run folder to take the pinned result from")
    ap.add_argument("--generations", type=int, default=12, help="generations of the pinning run")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="embedpin-estimator-")
    comp = load_components("micro")
    target = target_image(comp, tmp)
    run_dir = a.pinned or pinned_run(target, tmp, a.generations)
    cfg = RunConfig.from_toml(os.path.join(run_dir, "config.toml"))
    cfg.score.targets = [target]
    if a.roots:
        cfg.render.roots = a.roots
    if a.renoise is not None:
        cfg.render.renoise = a.renoise
    session = Session.prepare(cfg.validate())
    names = ["plain prompt", "pinned result", "caption"]
    pinned = load_pinned(run_dir)[0]["prompt_embeds"]
    conds = torch.cat([encode_prompt(comp, PROMPT).hidden, pinned, encode_prompt(comp, CAPTION).hidden])
    neg, scale = session.ctx.negative.hidden, cfg.render.cfg
    hyper = losses(session, conds, neg, scale, session.plan, a.seeds)
    plain = losses(session, conds, neg, scale, replace(session.plan, hyperbatch=False), a.seeds)
    B, sched = cfg.render.batch, session.plan.schedule()
    print(f"{a.seeds} seeds x B={B} = {a.seeds * B} images per mode; hyperbatch branches at {sched} "
          f"({cfg.render.roots} roots), renoise {cfg.render.renoise}; run {run_dir}")
    rows = []
    for k, name in enumerate(names):
        for what, h, p in (("loss", hyper[0][:, k], plain[0][:, k]), ("flip", hyper[1][:, k], plain[1][:, k])):
            d = h - p
            se = d.std(ddof=1) / np.sqrt(len(d)) / p.mean()
            rows.append((name, what, h.mean() / p.mean(), se))
            print(f"{name:14s} {what}: hyperbatch {h.mean():.4f}  plain {p.mean():.4f}  ratio {h.mean() / p.mean():.3f}"
                  f" (se {se:.3f})")
    for name, what, ratio, _se in rows:
        if name != "caption":
            print(f"{name.replace(' ', '_')}_{what}_hyperbatch_over_plain: {ratio:.3f}")
    print(f"max_abs_deviation: {max(abs(r - 1) for n, _, r, _ in rows if n != 'caption'):.3f}")


if __name__ == "__main__":
    main()
