"""What each lever of the gradient inversion stage gives, alone (no CMA-ES after it): the fitted
vectors used as a textual-inversion file, on seeds nobody searched, against the plain prompt.

Per development pair of ``generalization.py`` (the same draw, the same unseen seeds and
``flip-evaluator`` scoring) and per setting: ``evaluation.inversion.invert`` from the run's
session, then the vectors' conditioning rendered by a plain diffusers pipeline on 16 unseen
seeds; printed: seconds, mean ꟻLIP and the gap closed, (plain - x) / (plain - caption).

Settings are ``key=value`` lists joined by ``;`` (empty: the base): ``n`` vectors, ``place``
(before / after), ``lr``, ``steps``, ``batch``, ``init`` (an init word). The base is the first
stage as it was first built: 2 vectors after the words, lr 0.3, 300 steps, batch 16.

Measured (2 CPU cores, shared; gap closed per pair, above 1 is closer than the caption):

    setting                           pair 0   pair 1   pair 2   pair 3
    base (n=2, after, lr 0.3)          0.65     0.21    -0.29     0.56
    place=before                       1.78
    n=1                                0.07
    n=4                                2.42
    init=<|endoftext|>                 1.12
    lr=1.0                             1.27
    steps=600                          1.01
    before, n=4, lr=1.0 (the default)  2.52     1.20     0.78
    ... and init=<|endoftext|>         2.80     1.15     0.76

so the defaults are 4 vectors before the words at lr 1.0, started at the auto init words (as
good as the end-of-text token with the rest fixed).

    python benchmarks/inversion_levers.py OUT_DIR 4 ";place=before,n=4,lr=1.0"
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generalization as G  # noqa: E402


def main() -> None:
    from embedpin.config import MICRO, RunConfig
    from embedpin.evaluation.inversion import InversionSettings, conditioning, invert
    from embedpin.evaluation.session import Session

    out, n_pairs, settings = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(";")
    out.mkdir(parents=True, exist_ok=True)
    pipe = G.pipeline()
    chosen, _ = G.pairs(G.DEV_SEED, n_pairs, pipe, out, 16)
    closed: dict[str, list[float]] = {}
    for pair, (paths, (plain, oracle)) in chosen:
        p, o = plain.mean(), oracle.mean()
        print(f"{pair.name} [{pair.prompt}] -> [{pair.caption}] plain {p:.3f} caption {o:.3f}", flush=True)
        targets = G.read_targets(paths)
        for setting in settings:
            kv = dict(x.split("=") for x in setting.split(",")) if setting else {}
            c = RunConfig()
            c.prompt.prompt, c.score.targets = pair.prompt, paths
            c.search.n_vectors, c.search.placement = int(kv.get("n", 2)), kv.get("place", "after")
            c.search.init_word = kv.get("init", c.search.init_word)
            s = Session.prepare(c.validate())
            t0 = time.perf_counter()
            v = invert(s.ctx, s.targets, InversionSettings(steps=int(kv.get("steps", 300)),
                                                           batch=int(kv.get("batch", 16)), lr=float(kv.get("lr", 0.3))))
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                text, _ = conditioning(s.ctx, v)
            f = G.unseen(pipe, targets, 16, MICRO.steps, MICRO.cfg, prompt_embeds=text,
                         negative_prompt_embeds=s.ctx.negative.hidden).mean()
            closed.setdefault(setting or "base", []).append((p - f) / (p - o))
            print(f"   {setting or 'base':40s} {seconds:5.0f}s flip {f:.3f} gap closed {closed[setting or 'base'][-1]:+.2f}",
                  flush=True)
    for setting, values in closed.items():
        print(f"gap_closed_median[{setting}]: {float(np.median(values)):.3f}")


if __name__ == "__main__":
    main()
