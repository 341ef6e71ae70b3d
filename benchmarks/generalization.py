"""Do pinned results hold on seeds the run never saw, rendered in a plain diffusers pipeline?

For each (prompt, target) pair on the micro model — colour, shape, position, background
and size changes, vague prompts to specific targets, two objects, a set of 3 targets, a
drawn target the model did not render — one embedpin run, then five conditionings
rendered by a plain ``StableDiffusionPipeline`` with the run's scheduler, steps and CFG on
``--test-seeds`` seeds that neither the search nor the run's validation used:

- plain: the prompt as written;
- oracle: the caption that drew the target (for the drawn target: the caption it was
  drawn from, which the model renders in its own way);
- pinned: the run's ``--format diffusers`` export (``prompt_embeds``);
- ti: its ``--format textual-inversion`` file alone, loaded with
  ``load_textual_inversion`` and used as ``"<prompt> <pinned>"``;
- start: the search's starting point (its initial mean, decoded; no search).

Scored with the reference ``flip-evaluator`` package (mean ꟻLIP per image, averaged over
the target set). Headline figures, last, for the pinned result and (``start_…``) for the
starting point:

- median_gap_closed: median over pairs of (plain - pinned) / (plain - oracle), goal >= 0.5;
- pairs_worse_than_plain: pairs where pinned > plain on the unseen seeds, goal 0;
- generalization_gap: median of (pinned / plain, unseen seeds) / (pinned / plain, the run's
  own validation figures), goal <= 1.15;
- renders_per_run: images a run renders, validation included, and its largest ratio to the
  budget (16 generations of the default run before validation: token vectors and weights,
  λ·B each), goal <= 1.

``--set section.key=value`` overrides the run config (repeatable; lists comma-separated),
so one script measures every lever; ``--json FILE`` keeps the per-pair figures.

    python benchmarks/generalization.py [--pairs 1,2,...] [--generations G] [--set optim.search_seeds=fixed]
        [--test-seeds 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


@dataclass(frozen=True)
class Pair:
    name: str
    prompt: str
    caption: str
    kind: str = "render"  # render: the model's render of caption; set3: three renders; drawn: procedural


PAIRS = (
    Pair("colour", "a large star in the center on a plain blue background",
         "a large red star in the center on a plain blue background"),
    Pair("shape", "a large green circle in the center on a plain white background",
         "a large green square in the center on a plain white background"),
    Pair("position", "a small red circle on a plain white background",
         "a small red circle at the top left on a plain white background"),
    Pair("background", "a large yellow star in the center",
         "a large yellow star in the center on a blue striped background"),
    Pair("size", "an orange triangle in the center on a plain black background",
         "a small orange triangle in the center on a plain black background"),
    Pair("vague-star", "a star", "a large red star at the top left on a plain blue background"),
    Pair("vague-picture", "a picture", "a small white cross at the bottom right on a purple gradient background"),
    Pair("two-objects", "two shapes on a background",
         "a small red circle at the top left and a small yellow square at the bottom right on a plain blue background"),
    Pair("set-of-3", "a star", "a large purple star in the center on a yellow gradient background", "set3"),
    Pair("drawn", "a triangle", "a large blue triangle at the top right on a plain orange background", "drawn"),
    Pair("colour-background", "a circle", "a large black circle in the center on a white striped background"),
    Pair("position-colour", "a small cross", "a small green cross at the bottom left on a plain yellow background"),
)
TARGET_SEED, TEST_SEED = 4242, 20_000


def pipeline(config):
    """A plain diffusers pipeline of the micro model with the run's scheduler."""
    from diffusers import StableDiffusionPipeline

    from embedpin.models.components import make_scheduler
    from embedpin.models.loader import MICRO_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    pipe.scheduler = make_scheduler(config.render.scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_render(pipe, config, seeds: list[int], **conditioning) -> np.ndarray:
    """One image per seed, float [n, 64, 64, 3] in [0, 1] (each seed its own generator)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    if "prompt" in conditioning:
        conditioning = dict(prompt=[conditioning["prompt"]] * n, negative_prompt=[config.prompt.negative] * n)
    else:
        conditioning = {k: v.expand(n, -1, -1) for k, v in conditioning.items()}
    size = config.render.size or 64
    with torch.no_grad():
        return pipe(**conditioning, num_inference_steps=config.render.steps, guidance_scale=config.render.cfg,
                    height=size, width=size, generator=gens, output_type="np").images


def make_targets(pair: Pair, index: int, pipe, config, folder: Path) -> list[str]:
    """The pair's target PNG(s) in ``folder``."""
    from PIL import Image

    from embedpin.models.micro import dataset

    folder.mkdir(parents=True, exist_ok=True)
    if pair.kind == "drawn":
        scene = dataset.Scene((dataset.Item("triangle", "blue", "large", "at the top right"),), "orange", "plain")
        assert scene.caption == pair.caption
        images = [dataset.render_scene(scene)]
    else:
        seeds = [TARGET_SEED + 10 * index + j for j in range(3 if pair.kind == "set3" else 1)]
        images = [(x * 255 + 0.5).astype(np.uint8) for x in pipe_render(pipe, config, seeds, prompt=pair.caption)]
    paths = []
    for j, img in enumerate(images):
        paths.append(str(folder / f"target_{j}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def reference_flip(images: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Mean ꟻLIP (flip-evaluator, LDR) of each image [n, H, W, 3] to the targets: [n]."""
    import flip_evaluator

    return np.array([np.mean([flip_evaluator.evaluate(t.copy(), x.astype(np.float32).copy(), "LDR",
                                                      applyMagma=False)[1] for t in targets]) for x in images])


def run_config(pair: Pair, targets: list[str], out: str, sets: list[str], generations: int | None):
    from embedpin.config import RunConfig

    c = RunConfig()
    c.prompt.prompt, c.score.targets, c.out = pair.prompt, targets, out
    c.optim.tol_fun = c.optim.tol_x = 0.0
    for item in sets:
        apply_setting(c, item)
    if generations:
        c.optim.generations = generations
    return c.validate()


def apply_setting(c, item: str) -> None:
    """``section.key=value`` onto the config, typed like the field's current value."""
    key, _, value = item.partition("=")
    section, _, name = key.partition(".")
    obj = getattr(c, section)
    old = getattr(obj, name)
    if isinstance(old, bool):
        new = value.lower() in ("1", "true", "yes")
    elif isinstance(old, list):
        new = [v for v in value.split(",") if v]
    elif isinstance(old, int) and not isinstance(old, bool):
        new = int(value)
    elif isinstance(old, float):
        new = float(value)
    elif value.lower() in ("none", ""):
        new = None
    else:
        new = type(old)(value) if old is not None else _number(value)
    setattr(obj, name, new)


def _number(value: str):
    for t in (int, float):
        try:
            return t(value)
        except ValueError:
            pass
    return value


def budget(config) -> tuple[int, int]:
    """(renders of 16 generations of the default run before validation existed, its λ) for
    this prompt: token vectors (at "shape") and token weights, no validation, fixed seeds."""
    from embedpin.config import RunConfig
    from embedpin.optimizer.cmaes import default_population
    from embedpin.optimizer.session import Session

    d = RunConfig()
    d.prompt.prompt, d.score.targets = config.prompt.prompt, config.score.targets
    d.search.blocks, d.search.init_word, d.prompt.guide_target = ["token_vectors", "token_weights"], "shape", False
    d.optim.validation_seeds, d.optim.search_seeds = 0, "fixed"
    s = Session.prepare(d.validate())
    lam = default_population(s.space.n)
    return 16 * lam * d.render.batch, lam


def fit_generations(config, limit: int) -> int:
    """The most generations whose renders (validation included) fit ``limit``."""
    from embedpin.optimizer.cmaes import default_population
    from embedpin.optimizer.session import Session

    s = Session.prepare(config)
    lam = config.optim.population or default_population(s.space.n)
    v = config.optim.validation_seeds
    per = lam * config.render.batch + v  # the generation's best on the validation seeds
    return max(1, (limit - 3 * v) // per)  # + the plain prompt, the first and the last mean


def start_conditioning(config) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_embeds / negative of the search's starting point (x0 decoded)."""
    from embedpin.guidance.build import build
    from embedpin.optimizer.session import Session

    s = Session.prepare(config)
    params = s.space.decode(s.space.x0()[None])
    cond = build(s.ctx, {k: torch.as_tensor(v).to(s.ctx.plain.hidden) for k, v in params.items()})
    return cond.prompt_embeds[:1], cond.negative_embeds[:1]


def evaluate_pair(pair: Pair, index: int, args, pipe, base, tmp: Path) -> dict:
    from PIL import Image

    from embedpin.pinned import export_run, load_pinned
    from embedpin.runner import run

    folder = tmp / f"{index:02d}-{pair.name}"
    targets = make_targets(pair, index, pipe, base, folder / "targets")
    config = run_config(pair, targets, str(folder / "runs"), args.set, None)
    limit, lam = budget(config)
    if not args.generations:
        config.optim.generations = fit_generations(config, limit)
    else:
        config.optim.generations = args.generations
    t = time.perf_counter()
    result = run(config, quiet=True)
    seconds = time.perf_counter() - t
    state = json.loads((result.run_dir / "state.json").read_text())
    export_run(result.run_dir, "diffusers", folder / "pinned_embeds.safetensors")
    tensors, recipe = load_pinned(result.run_dir)
    recipe_cfg = recipe["cfg"]
    seeds = [TEST_SEED + j for j in range(args.test_seeds)]
    tgt = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in targets]
    flips = {
        "plain": reference_flip(pipe_render(pipe, config, seeds, prompt=pair.prompt), tgt),
        "oracle": reference_flip(pipe_render(pipe, config, seeds, prompt=pair.caption), tgt),
        "pinned": reference_flip(pipe_render(pipe, replace_cfg(config, recipe_cfg), seeds,
                                             prompt_embeds=tensors["prompt_embeds"],
                                             negative_prompt_embeds=tensors["negative_prompt_embeds"]), tgt),
    }
    pe, ne = start_conditioning(config)
    flips["start"] = reference_flip(pipe_render(pipe, config, seeds, prompt_embeds=pe, negative_prompt_embeds=ne), tgt)
    if "token_vectors" in tensors:
        ti = folder / "pinned_ti.safetensors"
        export_run(result.run_dir, "textual-inversion", ti)
        pipe.load_textual_inversion(str(ti), token="<pinned>")
        try:
            flips["ti"] = reference_flip(pipe_render(pipe, config, seeds, prompt=f"{pair.prompt} <pinned>"), tgt)
        finally:
            pipe.unload_textual_inversion()
    elif recipe["candidate"] == "plain":  # nothing beat the plain prompt: the user keeps the prompt
        flips["ti"] = flips["plain"]
    means = {k: float(v.mean()) for k, v in flips.items()}
    plain_v = state.get("plain_validation") or {"flip": search_seed_plain_flip(config)}
    first = json.loads((result.run_dir / "generations" / "0000" / "generation.json").read_text())
    start_v = next((v for v in first.get("validation", []) if v["kind"] == "mean"), None)
    row = {"pair": pair.name, "prompt": pair.prompt, "caption": pair.caption, "unseen": means,
           "unseen_se": {k: float(v.std(ddof=1) / math.sqrt(len(v))) for k, v in flips.items()},
           "in_run": {"pinned": _ratio(state["best"].get("flip"), plain_v.get("flip")),
                      "start": _ratio(start_v and start_v["flip"], plain_v.get("flip"))},
           "renders": result.renders, "budget": limit, "lambda": lam, "generations": result.generations,
           "seconds": seconds, "pinned_kind": state["best"].get("kind"), "pinned_generation": state["best"]["generation"],
           "run_dir": str(result.run_dir)}
    return row


def search_seed_plain_flip(config) -> float:
    """Without validation the run's own figure is its search loss: the plain prompt's mean ꟻLIP
    on generation 0's search seeds, for the in-run ratio."""
    from embedpin.guidance.encode import encode_prompt
    from embedpin.optimizer.session import Session
    from embedpin.render.sampler import render

    s = Session.prepare(config)
    out = render(s.components, encode_prompt(s.components, config.prompt.prompt).hidden, s.ctx.negative.hidden,
                 config.render.cfg, s.search_plan(0))
    return float(s.scorer(out.images, out.lineage, out.roots).flip[0])


def replace_cfg(config, cfg: float):
    c = replace(config, render=replace(config.render, cfg=float(cfg)))
    return c


def _ratio(a, b):
    return None if a is None or b is None or not b else float(a) / float(b)


def gap_closed(row: dict, key: str) -> float:
    u = row["unseen"]
    return (u["plain"] - u[key]) / (u["plain"] - u["oracle"]) if u["plain"] != u["oracle"] else math.nan


def generalization(row: dict, key: str) -> float:
    u, r = row["unseen"], row["in_run"].get(key)
    return (u[key] / u["plain"]) / r if r else math.nan


def headline(rows: list[dict]) -> None:
    for prefix, key in (("", "pinned"), ("start_", "start"), ("ti_", "ti")):
        have = [r for r in rows if key in r["unseen"]]
        if not have:
            continue
        print(f"{prefix}median_gap_closed: {np.nanmedian([gap_closed(r, key) for r in have]):.3f}")
        print(f"{prefix}pairs_worse_than_plain: {sum(r['unseen'][key] > r['unseen']['plain'] for r in have)}")
        print(f"{prefix}median_unseen_ratio_vs_plain: {np.median([r['unseen'][key] / r['unseen']['plain'] for r in have]):.3f}")
        if key != "ti":
            print(f"{prefix}generalization_gap: {np.nanmedian([generalization(r, key) for r in have]):.3f}")
    print(f"renders_per_run: {max(r['renders'] for r in rows)}")
    print(f"renders_per_run_over_budget: {max(r['renders'] / r['budget'] for r in rows):.3f}")


def main() -> None:
    from embedpin.config import RunConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default=None, help="comma-separated 1-based pair numbers (default: all)")
    ap.add_argument("--generations", type=int, default=None, help="default: the most that fit the render budget")
    ap.add_argument("--test-seeds", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", default=None, help="write the per-pair rows here")
    args = ap.parse_args()
    chosen = [int(i) for i in args.pairs.split(",")] if args.pairs else list(range(1, len(PAIRS) + 1))
    tmp = Path(tempfile.mkdtemp(prefix="embedpin-generalization-"))
    base = RunConfig()
    pipe = pipeline(base)
    rows = []
    print(f"settings: {args.set or 'defaults'}; {args.test_seeds} unseen seeds from {TEST_SEED}", flush=True)
    for i in chosen:
        row = evaluate_pair(PAIRS[i - 1], i, args, pipe, base, tmp)
        rows.append(row)
        u = row["unseen"]
        print(f"{i:2d} {row['pair']:18s} plain {u['plain']:.3f}  oracle {u['oracle']:.3f}  pinned {u['pinned']:.3f} "
              f"(±{row['unseen_se']['pinned']:.3f})  start {u['start']:.3f}" + (f"  ti {u['ti']:.3f}" if "ti" in u else "")
              + f" | gap closed {gap_closed(row, 'pinned'):.2f} | in-run ratio {row['in_run']['pinned'] or math.nan:.3f}"
              f" unseen {u['pinned'] / u['plain']:.3f} | {row['renders']} renders ({row['generations']} gen, "
              f"pinned {row['pinned_kind']} of gen {row['pinned_generation']}) {row['seconds']:.0f}s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"settings": args.set, "rows": rows}, indent=1))
    headline(rows)


if __name__ == "__main__":
    main()
