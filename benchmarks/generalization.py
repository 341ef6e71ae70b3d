"""Do pinned results hold on seeds the run never saw, on pairs nobody tuned for, in the file users load?

Pairs are drawn at random from the micro model's caption grammar (``models.micro.dataset``): a
scene and its caption; a target drawn from it (the model's render of the caption, three renders
of it as a set, or the scene drawn procedurally, which the model renders in its own way); and a
vague prompt made by dropping one to four of the caption's attribute groups (size, colour,
position, background — all four leave a bare object such as "a star"), on one- and two-object
scenes. A pair whose plain prompt already renders as close to the target as the caption does
(gap < ``MIN_GAP`` ꟻLIP on the unseen seeds, a figure that does not depend on any method) is
drawn again. ``--dev-seed`` (fixed: the pairs the defaults were chosen on) and ``--seed`` (any
other: pairs nobody looked at) each give ``--pairs`` pairs.

Per pair: one embedpin run at the defaults (``embedpin optimize --target T --prompt P``), then,
rendered by a plain ``StableDiffusionPipeline`` with the run's scheduler, steps and CFG on
``--test-seeds`` seeds that neither the search nor the run's validation used, and scored with
the reference ``flip-evaluator`` (mean ꟻLIP per image, averaged over the target set):

- plain: the prompt as written; oracle: the caption the target was drawn from;
- result: the run's ``--format diffusers`` export (``prompt_embeds``);
- file: its ``--format textual-inversion`` file, loaded with ``load_textual_inversion`` and
  used with the usage prompt the file names (the plain prompt where the run found nothing
  better than it: then there is no file to use);
- gradient_ti: textual inversion as diffusers' example trains it (``examples/textual_inversion``,
  its README's command: one vector at an initializer word, the "object" templates, random
  horizontal flips, batch 1 x 4 gradient accumulation, AdamW at 5e-4 scaled by 4, constant,
  weight decay 1e-2, the model's resolution), given the run's wall time on this machine, used
  as ``"<prompt> <token>"``. The initializer is the prompt's shape word (what a user names).

Headlines, last: ``result_gap_closed`` / ``file_gap_closed`` (median over the development pairs
of (plain - x) / (plain - oracle); goals >= 0.8 and >= 0.8 x the result's),
``pairs_ahead_of_gradient_ti_result`` / ``_file`` (share of pairs where x beats the baseline;
goal >= 0.9), ``pairs_worse_than_plain_result`` / ``_file`` (goal 0), ``fresh_minus_dev_result``
/ ``_file`` (the medians on the fresh pairs minus the development pairs; goal >= -0.05),
``file_validation_vs_benchmark`` (median |the run's file ꟻLIP on its validation seeds - this
benchmark's on the unseen seeds|; goal <= 0.1), the runs' seconds and the benchmark's.

``--json FILE`` keeps every pair's row and is read back on a rerun, so a long benchmark can be
stopped and continued; ``--set section.key=value`` overrides the run config (repeatable), so
one script measures every lever. ``--reuse-baseline OLD.json`` takes each pair's gradient-TI figures
from an earlier file's row of the same pair, so that a change of embedpin is measured without
training the baseline again (the baseline keeps the earlier run's time budget).

    python benchmarks/generalization.py --seed 7 [--pairs 40] [--json out.json] [--only dev|fresh]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

DEV_SEED = 2812
TEST_SEED = 20_000
MIN_GAP = 0.05
GROUPS = ("size", "colour", "position", "background")
KINDS = (("render", 0.7), ("two", 0.1), ("set3", 0.1), ("drawn", 0.1))


@dataclass(frozen=True)
class Pair:
    name: str
    prompt: str
    caption: str
    kind: str          # render | two | set3 | drawn
    scene: object      # dataset.Scene
    target_seed: int
    dropped: tuple[str, ...]


def vague_prompt(scene, dropped: set[str], background: str) -> str:
    """The caption of ``scene`` without the ``dropped`` attribute groups; ``background``: how
    much of the background phrase is left (full, colour, kind, word, none)."""
    def item(i) -> str:
        words = ["a", *([i.size] if "size" not in dropped else []), *([i.colour] if "colour" not in dropped else []),
                 i.shape, *([i.position] if "position" not in dropped else [])]
        return " ".join(words)

    fg = " and ".join(item(i) for i in scene.items)
    plain = scene.bg_kind == "plain"
    phrase = {"full": f"on a plain {scene.bg_colour} background" if plain else
              f"on a {scene.bg_colour} {scene.bg_kind} background",
              "colour": f"on a {scene.bg_colour} background", "kind": f"on a {scene.bg_kind} background",
              "word": "on a background", "none": ""}[background]
    return f"{fg} {phrase}".strip()


def draw_pair(rng: np.random.Generator, index: int) -> Pair:
    """One random pair (module doc)."""
    from embedpin.models.micro import dataset

    names, p = zip(*KINDS)
    kind = str(rng.choice(names, p=p))
    scene = dataset.random_scene(rng, p_two=1.0 if kind == "two" else 0.0, held_out=None)
    k = int(rng.integers(1, len(GROUPS) + 1))
    dropped = set(rng.choice(GROUPS, size=k, replace=False).tolist())
    background = str(rng.choice(["colour", "kind", "word", "none"])) if "background" in dropped else "full"
    prompt = vague_prompt(scene, dropped, background)
    return Pair(f"{index:02d}-{kind}", prompt, scene.caption, kind, scene, int(rng.integers(1 << 30)),
                tuple(sorted(dropped)))


def pipeline():
    """A plain diffusers pipeline of the micro model with the micro model's sampler."""
    from diffusers import StableDiffusionPipeline

    from embedpin.config import MICRO
    from embedpin.models.components import make_scheduler
    from embedpin.models.loader import MICRO_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(MICRO_DIR), local_files_only=True)
    pipe.scheduler = make_scheduler(MICRO.scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_render(pipe, seeds: list[int], steps: int, cfg: float, **conditioning) -> np.ndarray:
    """One image per seed, float [n, H, W, 3] in [0, 1] (each seed its own generator)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = len(seeds)
    if "prompt" in conditioning:
        conditioning = dict(prompt=[conditioning["prompt"]] * n, negative_prompt=[""] * n)
    else:
        conditioning = {k: v.expand(n, -1, -1) for k, v in conditioning.items()}
    with torch.no_grad():
        return pipe(**conditioning, num_inference_steps=steps, guidance_scale=cfg, height=64, width=64,
                    generator=gens, output_type="np").images


def make_targets(pair: Pair, pipe, folder: Path) -> list[str]:
    """The pair's target PNG(s) in ``folder``."""
    from PIL import Image

    from embedpin.config import MICRO
    from embedpin.models.micro import dataset

    folder.mkdir(parents=True, exist_ok=True)
    if pair.kind == "drawn":
        images = [dataset.render_scene(pair.scene)]
    else:
        seeds = [pair.target_seed + j for j in range(3 if pair.kind == "set3" else 1)]
        images = [(x * 255 + 0.5).astype(np.uint8) for x in pipe_render(pipe, seeds, MICRO.steps, MICRO.cfg,
                                                                          prompt=pair.caption)]
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


def read_targets(paths: list[str]) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]


def unseen(pipe, targets: list[np.ndarray], n: int, steps: int, cfg: float, **conditioning) -> np.ndarray:
    """Per-seed ꟻLIP [n] of ``conditioning`` rendered on the unseen seeds."""
    seeds = [TEST_SEED + j for j in range(n)]
    return reference_flip(pipe_render(pipe, seeds, steps, cfg, **conditioning), targets)


# --- the gradient textual-inversion baseline: diffusers' example, as its README runs it ---------------------

OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
                    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
                    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
                    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
                    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
                    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
                    "a photo of a cool {}", "a photo of a small {}")
RECIPE = {"lr": 5e-4 * 4, "accumulation": 4, "weight_decay": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "flip_p": 0.5}


def initializer(prompt: str) -> str:
    """The word a user would start the placeholder at: the prompt's (first) shape word."""
    from embedpin.models.micro import dataset

    return next((w for w in prompt.split() if w in dataset.SHAPES), "shape")


def gradient_ti(components, target_paths: list[str], init_word: str, seconds: float, seed: int) -> tuple[torch.Tensor, int]:
    """One placeholder vector [1, Din] trained as the example trains it, for ``seconds`` of wall
    time (checked after each update); returns (vector, updates made)."""
    import torch.nn.functional as F

    from embedpin.evaluation.inversion import alphas_cumprod, training_target
    from embedpin.guidance.deltas import insert_vectors
    from embedpin.guidance.encode import encode_from_embeds, token_embeddings
    from embedpin.guidance.tokens import tokenize
    from embedpin.images import load_image

    t_end = time.perf_counter() + seconds
    py, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    images = torch.stack([load_image(p) for p in target_paths])
    prompts = []
    for template in OBJECT_TEMPLATES:  # every template ends with the placeholder
        t = tokenize(components, template.format("").strip(), 1)
        prompts.append((t, token_embeddings(components, t.ids)))
    word_ids = components.tokenizer(init_word, add_special_tokens=False).input_ids
    table = components.text_encoder.get_input_embeddings().weight.detach()
    v = table[word_ids].float().mean(0, keepdim=True).clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=RECIPE["lr"], betas=RECIPE["betas"], weight_decay=RECIPE["weight_decay"],
                            eps=RECIPE["eps"])
    vae, unet = components.vae, components.unet
    alpha_bars, prediction = alphas_cumprod(components), components.scheduler_config.get("prediction_type", "epsilon")
    scaling = float(vae.config.scaling_factor)
    updates = 0
    while time.perf_counter() < t_end:
        for _ in range(RECIPE["accumulation"]):
            x = images[py.randrange(len(images))]
            if py.random() < RECIPE["flip_p"]:
                x = x.flip(-1)
            with torch.no_grad():
                x0 = vae.encode(x[None] * 2 - 1).latent_dist.sample(gen) * scaling
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(len(alpha_bars), (1,), generator=gen)
            a = alpha_bars[t].view(-1, 1, 1, 1)
            tokens, embeds = prompts[py.randrange(len(prompts))]
            text, _ = encode_from_embeds(components, insert_vectors(embeds, v[None], tokens.placeholders), tokens.ids)
            out = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
            loss = F.mse_loss(out.float(), training_target(noise, x0, alpha_bars[t], prediction))
            (loss / RECIPE["accumulation"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates += 1
    return v.detach(), updates


# --- one pair ---------------------------------------------------------------------------------------------------

def run_config(pair: Pair, targets: list[str], out: str, sets: list[str]):
    from embedpin.config import RunConfig

    c = RunConfig()
    c.prompt.prompt, c.score.targets, c.out = pair.prompt, targets, out
    for item in sets:
        apply_setting(c, item)
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
    elif value.lower() in ("none", ""):
        new = None
    elif isinstance(old, int):
        new = int(value)
    elif isinstance(old, float):
        new = float(value)
    else:
        new = _number(value) if old is None else type(old)(value)
    setattr(obj, name, new)


def _number(value: str):
    for t in (int, float):
        try:
            return t(value)
        except ValueError:
            pass
    return value


def save_vector(vector: torch.Tensor, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"emb_params": vector.float().contiguous()}, str(path))
    return path


def with_embedding(pipe, path: Path, token: str, fn):
    """``fn()`` with the textual-inversion file at ``path`` loaded under ``token``."""
    pipe.load_textual_inversion(str(path), token=token)
    try:
        return fn()
    finally:
        pipe.unload_textual_inversion()


def evaluate_pair(pair: Pair, pipe, components, folder: Path, args, plain_oracle, earlier: dict | None = None) -> dict:
    """One pair's row (module doc); ``earlier``: this pair's row from ``--reuse-baseline``, whose
    gradient-TI figures are taken instead of training the baseline again."""
    from embedpin.exports import export_run, load_pinned
    from embedpin.runner import run

    paths, (plain, oracle) = plain_oracle
    tgt = read_targets(paths)
    config = run_config(pair, paths, str(folder / "runs"), args.set)
    t0 = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - t0
    state = json.loads((result.run_dir / "state.json").read_text())
    tensors, recipe = load_pinned(result.run_dir)
    steps, cfg = recipe["steps"], recipe["cfg"]
    flips = {"plain": plain, "oracle": oracle,
             "result": unseen(pipe, tgt, args.test_seeds, steps, cfg, prompt_embeds=tensors["prompt_embeds"],
                              negative_prompt_embeds=tensors["negative_prompt_embeds"])}
    file_info = state.get("file") or {}
    if "file_vectors" not in tensors:  # no file beat the plain prompt on the run's validation seeds
        flips["file"], usage = plain, pair.prompt
    else:
        out = export_run(result.run_dir, "textual-inversion", folder / "pinned.safetensors").path
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            meta = json.loads(f.metadata()["embedpin"])
        usage = meta["usage"]
        flips["file"] = with_embedding(pipe, out, meta["token"], lambda: unseen(
            pipe, tgt, args.test_seeds, steps, meta.get("cfg", cfg), prompt=usage))
    means = {k: float(np.mean(v)) for k, v in flips.items()}
    se = {k: float(np.std(v, ddof=1) / math.sqrt(len(v))) for k, v in flips.items()}
    if earlier is None:
        vector, updates = gradient_ti(components, paths, initializer(pair.prompt), seconds, seed=0)
        ti = save_vector(vector, folder / "gradient_ti.safetensors")
        flips["gradient_ti"] = with_embedding(pipe, ti, "<ti>", lambda: unseen(
            pipe, tgt, args.test_seeds, steps, cfg, prompt=f"{pair.prompt} <ti>"))
        means["gradient_ti"] = float(np.mean(flips["gradient_ti"]))
        se["gradient_ti"] = float(np.std(flips["gradient_ti"], ddof=1) / math.sqrt(len(flips["gradient_ti"])))
    else:
        means["gradient_ti"], se["gradient_ti"] = earlier["unseen"]["gradient_ti"], earlier["unseen_se"]["gradient_ti"]
        updates = earlier["gradient_ti_updates"]
    return {"pair": pair.name, "prompt": pair.prompt, "caption": pair.caption, "kind": pair.kind,
            "dropped": list(pair.dropped), "unseen": means, "usage": usage, "unseen_se": se,
            **({"gradient_ti_from": args.reuse_baseline} if earlier is not None else {}),
            "run": {"validation_loss": result.validation_loss, "plain_validation_loss": result.plain_validation_loss,
                    "file_validation_loss": file_info.get("loss"), "file_validation_flip": file_info.get("flip"),
                    "seconds": seconds, "generations": result.generations, "renders": result.renders,
                    "pinned_generation": recipe.get("generation"), "inversion": state.get("inversion")},
            "gradient_ti_updates": updates, "run_dir": str(result.run_dir)}


def gap_closed(row: dict, key: str) -> float:
    u = row["unseen"]
    return (u["plain"] - u[key]) / (u["plain"] - u["oracle"])


def known_pairs(rows: list[dict], name: str, seed: int) -> dict[int, tuple[str, str]]:
    """The measured pairs of set ``name`` drawn from ``seed``: {index: (prompt, caption)} (:func:`pairs`'s ``known``)."""
    return {int(r["pair"][:2]): (r["prompt"], r["caption"]) for r in rows if (r["set"], r["seed"]) == (name, seed)}


def pairs(seed: int, n: int, pipe, folder: Path, test_seeds: int, known: dict, redrawn: list):
    """The first ``n`` pairs of ``seed`` whose plain prompt leaves a gap, drawn as they are needed:
    (pair, (target paths, (plain [S], oracle [S])) or None) each. ``known`` maps a measured pair's
    index to its (prompt, caption): the draws are prefix-stable, so a draw that matches was accepted
    and one that differs was redrawn, and neither needs rendering (None). Each redraw appends to
    ``redrawn``."""
    from embedpin.config import MICRO

    rng, accepted = np.random.default_rng(seed), 0
    while accepted < n:
        pair = draw_pair(rng, accepted)
        if accepted in known:
            if known[accepted] == (pair.prompt, pair.caption):
                accepted += 1
                yield pair, None
            else:
                redrawn.append(pair.name)
            continue
        paths = make_targets(pair, pipe, folder / f"{seed}-{pair.name}" / "targets")
        tgt = read_targets(paths)
        plain = unseen(pipe, tgt, test_seeds, MICRO.steps, MICRO.cfg, prompt=pair.prompt)
        oracle = unseen(pipe, tgt, test_seeds, MICRO.steps, MICRO.cfg, prompt=pair.caption)
        if plain.mean() - oracle.mean() < MIN_GAP:
            redrawn.append(pair.name)
            continue
        accepted += 1
        yield pair, (paths, (plain, oracle))


def summary(rows: list[dict]) -> dict:
    med = lambda key: float(np.median([gap_closed(r, key) for r in rows])) if rows else math.nan  # noqa: E731
    ahead = lambda key: float(np.mean([r["unseen"][key] < r["unseen"]["gradient_ti"] for r in rows]))  # noqa: E731
    return {"result_gap_closed": med("result"), "file_gap_closed": med("file"),
            "gradient_ti_gap_closed": med("gradient_ti"),
            "pairs_ahead_of_gradient_ti_result": ahead("result"), "pairs_ahead_of_gradient_ti_file": ahead("file"),
            "pairs_worse_than_plain_result": sum(r["unseen"]["result"] > r["unseen"]["plain"] for r in rows),
            "pairs_worse_than_plain_file": sum(r["unseen"]["file"] > r["unseen"]["plain"] for r in rows),
            "pairs": len(rows)}


def print_row(row: dict) -> None:
    u = row["unseen"]
    print(f"{row['set']:5s} {row['pair']:9s} [{row['prompt']}] -> [{row['caption']}]\n"
          f"      plain {u['plain']:.3f} oracle {u['oracle']:.3f} | result {u['result']:.3f} "
          f"({gap_closed(row, 'result'):+.2f}) file {u['file']:.3f} ({gap_closed(row, 'file'):+.2f}) "
          f"gradient TI {u['gradient_ti']:.3f} ({gap_closed(row, 'gradient_ti'):+.2f}, {row['gradient_ti_updates']} "
          f"updates) | run {row['run']['seconds']:.0f}s, file val {row['run']['file_validation_flip']}", flush=True)


def headline(rows: list[dict], seconds: float) -> None:
    dev = [r for r in rows if r["set"] == "dev"]
    fresh = [r for r in rows if r["set"] == "fresh"]
    for name, group in (("dev", dev), ("fresh", fresh)):
        if group:
            print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in summary(group).items()))
    main = summary(dev or fresh)
    every = summary(rows)
    runs = [r["run"]["seconds"] for r in rows]
    diffs = [abs(r["run"]["file_validation_flip"] - r["unseen"]["file"]) for r in rows
             if r["run"].get("file_validation_flip") is not None]
    print(f"result_gap_closed: {main['result_gap_closed']:.3f}")
    print(f"file_gap_closed: {main['file_gap_closed']:.3f}")
    print(f"file_over_result: {main['file_gap_closed'] / main['result_gap_closed']:.3f}")
    print(f"gradient_ti_gap_closed: {main['gradient_ti_gap_closed']:.3f}")
    print(f"pairs_ahead_of_gradient_ti_result: {main['pairs_ahead_of_gradient_ti_result']:.3f}")
    print(f"pairs_ahead_of_gradient_ti_file: {main['pairs_ahead_of_gradient_ti_file']:.3f}")
    print(f"pairs_worse_than_plain_result: {every['pairs_worse_than_plain_result']}")
    print(f"pairs_worse_than_plain_file: {every['pairs_worse_than_plain_file']}")
    if dev and fresh:
        d, f = summary(dev), summary(fresh)
        print(f"fresh_minus_dev_result: {f['result_gap_closed'] - d['result_gap_closed']:+.3f}")
        print(f"fresh_minus_dev_file: {f['file_gap_closed'] - d['file_gap_closed']:+.3f}")
    if diffs:
        print(f"file_validation_vs_benchmark: {float(np.median(diffs)):.3f}")
    print(f"run_seconds_median: {float(np.median(runs)):.0f}")
    print(f"run_seconds_max: {max(runs):.0f}")
    print(f"benchmark_seconds: {seconds:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="the fresh pairs' seed (any but the development seed)")
    ap.add_argument("--dev-seed", type=int, default=DEV_SEED)
    ap.add_argument("--pairs", type=int, default=40, help="pairs per seed")
    ap.add_argument("--only", choices=("dev", "fresh"), default=None)
    ap.add_argument("--test-seeds", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", default=None, help="keep the rows here (read back on a rerun: done pairs are skipped)")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="measure only the pairs whose index is I modulo N (N processes side by side, each with its "
                         "own --json; the headline of all rows: --summary A.json B.json ...)")
    ap.add_argument("--summary", nargs="+", default=None, metavar="JSON", help="print the headline of these rows")
    ap.add_argument("--reuse-baseline", default=None, metavar="JSON",
                    help="take each pair's gradient-TI figures from this file's row of the same pair (the baseline "
                         "does not depend on embedpin's code: measure a change of embedpin without training it again; "
                         "its time budget stays the earlier run's)")
    args = ap.parse_args()
    if args.summary:
        rows = [r for f in args.summary for r in json.loads(Path(f).read_text())["rows"]]
        headline(list({(r["set"], r["seed"], r["pair"]): r for r in rows}.values()), 0.0)
        return
    shard, shards = map(int, args.shard.split("/"))
    if args.seed is None and args.only != "dev":
        ap.error("give --seed for the fresh pairs (or --only dev)")
    from embedpin.models.loader import load_components

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="embedpin-generalization-"))
    pipe, components = pipeline(), load_components("micro", device="cpu")
    done = json.loads(Path(args.json).read_text())["rows"] if args.json and Path(args.json).is_file() else []
    rows = list(done)
    baseline = {(r["set"], r["seed"], r["pair"]): r for r in json.loads(Path(args.reuse_baseline).read_text())["rows"]} \
        if args.reuse_baseline else {}
    sets = [("dev", args.dev_seed), ("fresh", args.seed)]
    print(f"settings: {args.set or 'defaults'}; {args.pairs} pairs per seed (dev {args.dev_seed}, fresh {args.seed}); "
          f"{args.test_seeds} unseen seeds from {TEST_SEED}", flush=True)
    for name, seed in sets:
        if args.only and name != args.only:
            continue
        known = known_pairs(done, name, seed)
        redrawn: list[str] = []
        for index, (pair, plain_oracle) in enumerate(pairs(seed, args.pairs, pipe, tmp, args.test_seeds, known,
                                                           redrawn)):
            if plain_oracle is None or index % shards != shard:
                continue
            key = (name, seed, pair.name)
            row = evaluate_pair(pair, pipe, components, tmp / f"{seed}-{pair.name}", args, plain_oracle,
                                baseline.get(key))
            row.update({"set": name, "seed": seed, "settings": args.set})
            rows.append(row)
            print_row(row)
            if args.json:
                Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        print(f"{name} (seed {seed}): {len(redrawn)} pairs redrawn for a gap under {MIN_GAP}", flush=True)
    headline(rows, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
