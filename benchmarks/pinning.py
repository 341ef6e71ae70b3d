"""Pinning quality on the micro model: CMA-ES vs random search with the same renders.

A target is rendered from a hidden perturbation of the prompt's conditioning (the text
encoder's output moved toward another prompt's, blended — something no search block
contains exactly), as seed 003 recommends using the pinning tool: one image of a batch
rendered with the run's seed and settings (the trunk image, which every run's batch
shares the starting noise with). Starting from the plain prompt, a default run must bring
the loss to <= 60% of its first generation's best within 30 generations, and beat random
search (the same number of candidates drawn from the first generation's distribution).

Also printed: the loss of the plain prompt (the prompt alone: a run that searches token
vectors starts from it plus its placeholder tokens at the init word) and of the hidden
conditioning itself (the oracle: the other B - 1 images of its batch differ from the
target, so it is not 0); the best loss over the plain prompt's; the fraction of the
plain -> oracle gap closed; and what the token vectors alone (a textual-inversion file)
keep of the gain over the plain prompt.

    python benchmarks/pinning.py [--generations 30] [--blocks token_vectors,delta,token_vectors+token_weights]
        [--rank K] [--basis B] [--n-vectors N] [--init-word W] [--seed S] [--sigma0 S] [--no-random]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

PROMPT = "a large yellow star in the center on a blue striped background"
HIDDEN = "a large red star in the center on a blue striped background"


def hidden_conditioning(comp, blend: float) -> torch.Tensor:
    """The plain prompt's output sequence moved ``blend`` of the way toward HIDDEN's."""
    from embedpin.guidance.encode import encode_prompt

    plain, other = encode_prompt(comp, PROMPT).hidden, encode_prompt(comp, HIDDEN).hidden
    return plain + blend * (other - plain)


def make_target(folder: str, blend: float = 0.7, seed: int = 0) -> str:
    """Render the hidden conditioning with a default run's plan and seed; image 0 to a PNG."""
    from embedpin.config import RunConfig
    from embedpin.guidance.encode import encode_prompt
    from embedpin.models.loader import load_components
    from embedpin.optimizer.session import render_plan
    from embedpin.optimizer.store import save_png
    from embedpin.render.sampler import render

    comp = load_components("micro")
    cfg = RunConfig()
    cfg.optim.seed = seed
    plan = render_plan(cfg, comp.default_size)
    neg = encode_prompt(comp, cfg.prompt.negative).hidden
    img = render(comp, hidden_conditioning(comp, blend), neg, torch.tensor([cfg.render.cfg]), plan).images[0, 0]
    path = os.path.join(folder, "hidden_target.png")
    save_png(path, img)
    return path


def reference_losses(cfg, blend: float) -> tuple[float, float]:
    """Losses of the plain prompt and of the hidden conditioning (the oracle) on the run's plan.

    ``cfg`` must not search token vectors: a run that does starts from the prompt with its
    placeholder tokens at the init word appended, which is not the plain prompt."""
    from embedpin.optimizer.session import Session
    from embedpin.render.sampler import render

    s = Session.prepare(cfg)
    comp, neg = s.components, s.ctx.negative.hidden
    out = []
    for h in (s.ctx.plain.hidden, hidden_conditioning(comp, blend)):
        r = render(comp, h, neg, torch.tensor([cfg.render.cfg]), s.plan)
        out.append(float(s.scorer(r.images, r.lineage).loss[0]))
    return out[0], out[1]


def config(target: str, out: str, blocks: list[str], generations: int, rank: int | None = None,
           basis: str | None = None, seed: int = 0, sigma0: float | None = None, n_vectors: int | None = None,
           init_word: str | None = None):
    from embedpin.config import RunConfig

    c = RunConfig()
    c.optim.seed = seed
    if sigma0:
        c.optim.sigma0 = sigma0
    if rank:
        c.search.rank = rank
    if n_vectors:
        c.search.n_vectors = n_vectors
    if init_word:
        c.search.init_word = init_word
    if basis:
        c.search.basis = basis
    c.prompt.prompt = PROMPT
    c.score.targets = [target]
    c.search.blocks = blocks
    c.optim.generations = generations
    c.optim.tol_fun = c.optim.tol_x = 0.0
    c.out = out
    return c.validate()


def vectors_only(run_dir) -> tuple[float, float] | None:
    """Losses of a run's best candidate re-rendered on the run's plan: whole, and with its token
    vectors alone (what a textual-inversion file carries; every other block at its default).
    None where the run searched no token vectors."""
    from embedpin.config import RunConfig
    from embedpin.optimizer.session import Session

    cfg = RunConfig.from_toml(run_dir / "config.toml")
    best = json.loads((run_dir / "state.json").read_text())["best"]["params"]
    if "token_vectors" not in best:
        return None
    s = Session.prepare(cfg)
    x = s.space.encode({n: np.asarray(v) for n, v in best.items()})
    only, vectors = s.space.x0(), s.space.slices["token_vectors"]  # x0: every block at its default
    only[vectors] = x[vectors]
    loss = s.evaluate(np.stack([x, only])).score.loss
    return float(loss[0]), float(loss[1])


def default_blocks() -> list[str]:
    from embedpin.config import RunConfig

    return list(RunConfig().search.blocks)


def random_search(cfg, evaluations: int) -> float:
    """Best loss of ``evaluations`` candidates from N(0, sigma0^2 I) in the standardized space."""
    from embedpin.optimizer.session import Session

    s = Session.prepare(cfg)
    rng = np.random.default_rng(cfg.optim.seed + 77)
    lam = 10
    best = np.inf
    for _ in range(0, evaluations, lam):
        X = rng.normal(0.0, cfg.optim.sigma0, size=(lam, s.space.n))
        best = min(best, float(s.evaluate(X).score.loss.min()))
    return best


def main() -> None:
    from embedpin.optimizer.run import run

    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--blocks", default=None, help="comma-separated block sets, '+' inside a set "
                    "(default: a default run's, " + "+".join(default_blocks()) + ")")
    ap.add_argument("--blend", type=float, default=0.7)
    ap.add_argument("--rank", type=int, default=None, help="basis size K of delta / token vectors (default: the run's)")
    ap.add_argument("--basis", default=None, help="delta / token-vector basis (default: the run's)")
    ap.add_argument("--sigma0", type=float, default=None, help="initial step size (default: the run's)")
    ap.add_argument("--n-vectors", type=int, default=None, help="placeholder tokens (default: the run's)")
    ap.add_argument("--init-word", default=None, help="token vectors' start (default: the run's)")
    ap.add_argument("--seed", type=int, default=0, help="run seed (the target is rendered with it too)")
    ap.add_argument("--no-random", action="store_true", help="skip the random-search baseline (comparing blocks)")
    a = ap.parse_args()
    a.blocks = a.blocks or "+".join(default_blocks())
    tmp = tempfile.mkdtemp(prefix="embedpin-bench-")
    target = make_target(tmp, a.blend, a.seed)
    plain, oracle = reference_losses(config(target, tmp, ["token_weights"], 1, seed=a.seed), a.blend)
    print(f"plain prompt loss {plain:.4f}; hidden conditioning (oracle) loss {oracle:.4f}")
    rows, opts = [], (a.generations, a.rank, a.basis, a.seed, a.sigma0, a.n_vectors, a.init_word)
    for blocks in a.blocks.split(","):
        cfg = config(target, os.path.join(tmp, blocks), blocks.split("+"), *opts)
        t = time.perf_counter()
        res = run(cfg, quiet=True)
        secs = time.perf_counter() - t
        state = json.loads((res.run_dir / "state.json").read_text())
        n_cand = sum(len(json.loads((res.run_dir / "generations" / f"{h['generation']:04d}" / "generation.json")
                                    .read_text())["candidates"]) for h in state["history"])
        rnd = math.nan if a.no_random else random_search(
            config(target, os.path.join(tmp, blocks + "-rnd"), blocks.split("+"), *opts), n_cand)
        ti = vectors_only(res.run_dir)
        rows.append((blocks, res.first_best_loss, res.best_loss, rnd, secs, res.renders, ti))
        print(f"{blocks}: first-generation best {res.first_best_loss:.4f} -> best {res.best_loss:.4f} "
              f"(ratio {res.best_loss / res.first_best_loss:.3f}); random search best {rnd:.4f} "
              f"with {n_cand} candidates; {secs:.0f}s, {res.renders} renders; run {res.run_dir}")
        if ti:
            print(f"  re-rendered: best {ti[0]:.4f}; its token vectors alone (the textual-inversion file) {ti[1]:.4f}")
    print(f"oracle_loss_ratio_vs_plain: {oracle / plain:.3f}")
    for blocks, first, best, rnd, secs, renders, ti in rows:
        print(f"{blocks}_gap_closed_plain_to_oracle: {(plain - best) / (plain - oracle):.3f}")
        print(f"{blocks}_loss_ratio_vs_plain_prompt: {best / plain:.3f}")
        print(f"{blocks}_loss_ratio_vs_first_generation: {best / first:.3f}")
        if ti and ti[0] != ti[1]:
            print(f"{blocks}_textual_inversion_share_of_gain: {(plain - ti[1]) / (plain - ti[0]):.3f}")
        if not a.no_random:
            print(f"{blocks}_cmaes_vs_random_search_best_loss_ratio: {best / rnd:.3f}")


if __name__ == "__main__":
    main()
