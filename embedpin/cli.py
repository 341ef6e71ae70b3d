"""The ``embedpin`` command: optimize (and --resume), render, export, report, models.

A user mistake ends with one line ``error: ...`` on stderr and exit code 2; Ctrl-C
during a run leaves a resumable run and exits with 130.

Each command imports its stage inside its handler: ``embedpin --help`` and argument errors
answer without importing torch, diffusers or transformers (seconds each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from embedpin.errors import ConfigError, EmbedpinError

EPILOG = """examples:
  embedpin optimize --target examples/star.png --prompt "a star"
  embedpin optimize --resume runs/0001-a-star
  embedpin optimize --target examples/star.png --prompt "a star" --workers 2   # Ray workers, one per GPU
  embedpin export runs/0001-a-star --format textual-inversion -o pinned.safetensors
  embedpin render runs/0001-a-star --seed 7 -n 8 -o out/
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def _max_batch(text: str) -> int | None:
    """``--max-batch``: a number, or ``auto`` (None: probed on a GPU)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or auto: {text!r}") from None


def _optimize_parser(sub):
    from embedpin.config import BASES, BLOCKS, KEEP_IMAGES, PLACEMENTS, WEIGHTINGS, RunConfig, ScaleConfig, by_model
    from embedpin.models.schedulers import SCHEDULERS
    from embedpin.optimizer.cmaes import POLISH_GENERATIONS

    d, ds = RunConfig(), ScaleConfig()
    p = sub.add_parser("optimize", help="pin a prompt's conditioning to target image(s)")  # (each help text states its default)
    g = p.add_argument_group("inputs")
    g.add_argument("--target", action="append", default=None, metavar="PATH",
                   help="target image file or folder (repeatable); omitted: self mode, pin to lower "
                        "variation across seeds")
    g.add_argument("--mask", action="append", default=None, metavar="MASK",
                   help="which part of the target to pin: white = pin, black = ignore, grey = a weight between; "
                        "once for all targets or once per target, in target order (repeatable; resized with "
                        "its target; default: none, the whole image counts)")
    g.add_argument("--prompt", default=None, help="the prompt to pin")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--guide", action="append", default=None, metavar="IMAGE",
                   help="guide image for CLIP image guidance (FlexDiffuse mapping onto the prompt)")
    g.add_argument("--concepts", default=None, help="second prompt selecting which guide-image features map in")
    g.add_argument("--init-image", default=None, help="img2img init image")
    g.add_argument("--text-target", default=None, help="target text for a CLIP text loss")
    g.add_argument("--guide-target", action=argparse.BooleanOptionalAction, default=None,
                   help=f"without --guide: the target image(s) are the guide images of image guidance and "
                        f"the delta's image basis (default: {d.prompt.guide_target})")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"micro (built in) | diffusers folder | hub id (cached, else downloaded) | "
                                                 f".safetensors checkpoint (default: {d.model.name})")
    g.add_argument("--clip", action="append", default=None, metavar="FOLDER_OR_ID",
                   help="image CLIP model folder or hub id (real models; repeatable: SDXL takes one tower per "
                        "text encoder, e.g. ViT-L/14 and ViT-bigG/14; the first also serves the CLIP loss)")
    g.add_argument("--model-config", default=None,
                   help="single-file checkpoints: which configs to load them with, a shipped one (sd15, sd21, sd21-base, "
                        "sdxl-base) or a diffusers folder / hub id (default: the shipped config the file's shapes fit)")
    g.add_argument("--device", default=None, help=f"auto | cpu | cuda | cuda:N | mps (default: {d.model.device})")
    g.add_argument("--dtype", default=None, help=f"float32 | float16 | bfloat16 (default: {d.model.dtype})")
    g.add_argument("--clip-skip", type=int, default=None, help=f"skip last text-encoder layers (default: "
                                                                f"{d.prompt.clip_skip})")
    g = p.add_argument_group("search space")
    g.add_argument("--blocks", default=None,
                   help=f"comma-separated search blocks from {{{','.join(BLOCKS)}}} (default: "
                        f"{','.join(d.search.blocks)})")
    g.add_argument("--basis", default=None, choices=BASES,
                   help=f"basis of the conditioning delta and of the token vectors (these take pca or "
                        f"random; default: {d.search.basis})")
    g.add_argument("--rank", type=int, default=None, help=f"basis size K (default: {d.search.rank})")
    g.add_argument("--vectors", type=int, default=None, help=f"textual-inversion tokens (default: {d.search.n_vectors})")
    g.add_argument("--init-word", default=None,
                   help=f"token vectors start here: a word, comma-separated words (one per vector), or auto "
                        f"(the words CLIP ranks highest for the target; default: {d.search.init_word})")
    g.add_argument("--init-embedding", default=None, metavar="FILE.safetensors",
                   help="start the token vectors at an existing textual-inversion embedding (A1111 / ComfyUI / kohya "
                        "/ embedpin .safetensors of this model's family; its rows set the number of vectors, and "
                        "they are used even when token_vectors is not searched)")
    g.add_argument("--placement", default=None, choices=PLACEMENTS,
                   help=f"where the token vectors stand in the prompt you will use: after its words (\"<prompt> "
                        f"<pinned>\") or before them (\"<pinned> <prompt>\": the text encoder is causal, so only "
                        f"there can they change the words' states; default: {d.search.placement})")
    g.add_argument("--inversion-steps", type=int, default=None, metavar="N",
                   help=f"before the search, fit the token vectors to the targets by gradient descent on the model's "
                        f"own denoising loss (textual inversion, in the prompt as you will use it) for N steps; "
                        f"the search then starts there. 0: off, gradient-free only (default: "
                        f"{d.search.inversion_steps})")
    g.add_argument("--inversion-batch", type=int, default=None, metavar="N",
                   help=f"noised target samples per inversion step (default: {d.search.inversion_batch})")
    g.add_argument("--inversion-lr", type=float, default=None,
                   help=f"inversion step size, in typical token-embedding coordinates (default: "
                        f"{d.search.inversion_lr})")
    g = p.add_argument_group("optimizer")
    g.add_argument("--population", type=int, default=None, help="candidates per generation (default: 4 + 3 ln N)")
    g.add_argument("--generations", type=int, default=None,
                   help=f"generations (default: {POLISH_GENERATIONS} after the inversion stage, else 16 floor(ln N))")
    g.add_argument("--sigma0", type=float, default=None, help=f"initial step size (default: {d.optim.sigma0})")
    g.add_argument("--seed", type=int, default=None, help=f"seed for everything (default: {d.optim.seed})")
    g.add_argument("--max-distance", type=float, default=None,
                   help="multi-objective size limiter: best loss within this distance from the plain prompt")
    g.add_argument("--search-seeds", default=None, choices=["rotate", "fixed"],
                   help=f"rotate: new render seeds every generation; fixed: the same seeds every generation "
                        f"(default: {d.optim.search_seeds})")
    g.add_argument("--validation-seeds", type=int, default=None, metavar="N",
                   help=f"plain renders per validated candidate, on seeds the search never uses; the pinned "
                        f"result is the best on them; 0 turns validation off (default: {d.optim.validation_seeds})")
    g = p.add_argument_group("rendering")
    g.add_argument("--batch", type=int, default=None, help=f"images per candidate B (default: {d.render.batch})")
    g.add_argument("--steps", type=int, default=None, help=f"sampling steps (default, by model: {by_model('steps')})")
    g.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help=f"sampler (default, by model: {by_model('scheduler')})")
    g.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of the model's VAE x UNet factor (SD: 64); default: the "
                        "first target's aspect ratio at the model's native area (micro 64², SD 1.x 512², SD 2.x "
                        "768², SDXL 1024²); with only --width or --height, the other follows that ratio")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (see --width)")
    g.add_argument("--size", type=int, default=None, help="square images: --width and --height both this")
    g.add_argument("--cfg", type=float, default=None,
                   help=f"classifier-free guidance scale (default, by model: {by_model('cfg')})")
    g.add_argument("--strength", type=float, default=None, help=f"img2img strength (default: {d.render.strength})")
    g.add_argument("--renoise", type=float, default=None,
                   help="hyperbatch branch re-noise for deterministic samplers: eta of the ancestral step a "
                        "copy takes at branches after step 0, whose copy is a second root (default 1, the DDPM "
                        "posterior's amount; higher: more diverse siblings, from about 2 all noise is replaced "
                        "and colours wash out)")
    g.add_argument("--roots", type=int, default=None,
                   help=f"independent initial latents per candidate in a hyperbatch, a power of two; the rest "
                        f"of the batch branches from them (default: {d.render.roots})")
    g.add_argument("--max-batch", type=_max_batch, default=None, metavar="N|auto",
                   help="most images per UNet call, CFG halves included; auto: on a GPU the most its free memory "
                        "holds (measured by a probe; halved if a call still runs out of memory), elsewhere 256 "
                        "(default: auto)")
    g.add_argument("--no-hyperbatch", action="store_true", help="plain batches instead of hyperbatches")
    g = p.add_argument_group("loss")
    g.add_argument("--flip-weight", type=float, default=None, help=f"weight of ꟻLIP (default: {d.score.flip_weight})")
    g.add_argument("--clip-weight", type=float, default=None, help=f"weight of CLIP (default: {d.score.clip_weight})")
    g.add_argument("--std-weight", type=float, default=None,
                   help=f"weight of the spread across seeds (a std, from independent image pairs; default: {d.score.std_weight})")
    g.add_argument("--weighting", default=None, choices=WEIGHTINGS,
                   help=f"hyperbatch weighting over lineage depth (default: {d.score.weighting})")
    g.add_argument("--ppd", type=float, default=None, help=f"ꟻLIP pixels per degree (default: {d.score.ppd:.2f})")
    g = p.add_argument_group("scale-out (Ray; pip install 'embedpin[ray]'; the result does not depend on these, "
                             "so they are not part of the run's config.toml and work with --resume)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="render on N Ray workers: a local Ray cluster with one worker per GPU (CPU workers where "
                        "there is no GPU); with --ray-address, N workers on that cluster (default: one per GPU there)."
                        " 0: in this process (default)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (started with `ray start --head`; default: $RAY_ADDRESS)")
    g.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"a worker whose chunk takes longer counts as hung: it is restarted and its candidates re-run "
                        f"elsewhere; a model load may take this, and at least 600 s, the inversion stage as much per 100 "
                        f"steps (default: {ds.worker_timeout:g})")
    g.add_argument("--worker-restarts", type=int, default=None, metavar="N",
                   help=f"restarts of a dead or hung worker (each reloads the model) before it is given up "
                        f"(default: {ds.worker_restarts})")
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, metavar="FILE.toml", help="read settings from a TOML config first")
    g.add_argument("--out", default=None, help=f"folder for runs (default: {d.out})")
    g.add_argument("--keep-images", default=None, choices=KEEP_IMAGES,
                   help=f"best: at 256² and up the run keeps compressed thumbnails of every image and full-size "
                        f"PNGs of each generation's best candidate (any image re-renders exactly with embedpin "
                        f"render); all: full-size PNGs of every image (default: {d.keep_images})")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run")
    g.add_argument("--json", action="store_true", help="print one JSON summary object last")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(a):
    """Build the RunConfig: defaults, then --config TOML, then explicit flags."""
    from embedpin.config import RunConfig

    cfg = RunConfig.from_toml(a.config) if a.config else RunConfig()
    sets = {
        ("model", "name"): a.model, ("model", "clip"): a.clip, ("model", "model_config"): a.model_config,
        ("model", "device"): a.device, ("model", "dtype"): a.dtype,
        ("prompt", "prompt"): a.prompt, ("prompt", "negative"): a.negative, ("prompt", "guide"): a.guide,
        ("prompt", "concepts"): a.concepts, ("prompt", "init_image"): a.init_image,
        ("prompt", "clip_skip"): a.clip_skip, ("prompt", "guide_target"): a.guide_target,
        ("search", "blocks"): [b.strip() for b in a.blocks.split(",") if b.strip()] if a.blocks else None,
        ("search", "basis"): a.basis, ("search", "rank"): a.rank, ("search", "n_vectors"): a.vectors,
        ("search", "init_word"): a.init_word, ("search", "init_embedding"): a.init_embedding,
        ("search", "placement"): a.placement, ("search", "inversion_steps"): a.inversion_steps,
        ("search", "inversion_batch"): a.inversion_batch, ("search", "inversion_lr"): a.inversion_lr,
        ("optim", "population"): a.population, ("optim", "generations"): a.generations,
        ("optim", "sigma0"): a.sigma0, ("optim", "seed"): a.seed, ("optim", "max_distance"): a.max_distance,
        ("optim", "search_seeds"): a.search_seeds, ("optim", "validation_seeds"): a.validation_seeds,
        ("render", "roots"): a.roots,
        ("render", "batch"): a.batch, ("render", "steps"): a.steps, ("render", "scheduler"): a.scheduler,
        ("render", "size"): a.size, ("render", "width"): a.width, ("render", "height"): a.height,
        ("render", "cfg"): a.cfg, ("render", "strength"): a.strength,
        ("render", "max_batch"): a.max_batch, ("render", "renoise"): a.renoise,
        ("render", "hyperbatch"): False if a.no_hyperbatch else None,
        ("score", "targets"): a.target, ("score", "masks"): a.mask, ("score", "text_target"): a.text_target,
        ("score", "flip_weight"): a.flip_weight, ("score", "clip_weight"): a.clip_weight,
        ("score", "std_weight"): a.std_weight, ("score", "weighting"): a.weighting, ("score", "ppd"): a.ppd,
    }
    for (section, key), value in sets.items():
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if a.out is not None:
        cfg.out = a.out
    if a.keep_images is not None:
        cfg.keep_images = a.keep_images
    return cfg.validate()


def scale_from_args(a):
    """The ScaleConfig: --workers, --ray-address (else $RAY_ADDRESS), --worker-timeout, --worker-restarts."""
    from embedpin.config import ScaleConfig

    scale = ScaleConfig()
    address = a.ray_address if a.ray_address is not None else os.environ.get("RAY_ADDRESS") or None
    for key, value in (("workers", a.workers), ("ray_address", address), ("worker_timeout", a.worker_timeout),
                       ("worker_restarts", a.worker_restarts)):
        if value is not None:
            setattr(scale, key, value)
    return scale.validate()


def cmd_optimize(a) -> int:
    config = None if a.resume else config_from_args(a)  # argument errors answer before torch is imported
    scale = scale_from_args(a)
    from embedpin.runner import resume, run

    result = resume(a.resume, quiet=a.quiet, scale=scale) if a.resume else run(config, quiet=a.quiet, scale=scale)
    if a.json:
        print(json.dumps(result.summary()))
    elif not a.quiet:
        print(result.describe())
    return 130 if result.interrupted else 0


def cmd_render(a) -> int:
    from embedpin.pinned import render_image, render_pinned

    if a.image:
        print(f"wrote {render_image(a.source, a.image, a.out, device=a.device)}")
        return 0
    paths = render_pinned(a.source, seed=a.seed, n=a.n, out=a.out, steps=a.steps, device=a.device, model=a.model,
                          model_config=a.model_config)
    print(f"wrote {len(paths)} image(s) to {a.out}")
    return 0


def cmd_export(a) -> int:
    from embedpin.pinned import export_run

    done = export_run(a.run, a.format, a.output, token=a.token)
    print("\n".join(done.describe()))
    if done.lost:
        print(f"note: the embedding alone renders '{done.usage}' without the run's {', '.join(done.lost)} "
              "(a textual-inversion file cannot carry them; they are in its metadata). "
              "For the exact pinned result use --format diffusers.", file=sys.stderr)
    return 0


def cmd_report(a) -> int:
    from embedpin.reports.builder import rebuild
    from embedpin.store import RunStore

    store = RunStore.open(a.run)
    rebuild(store.root)
    print(f"wrote {store.root / 'index.html'}")
    return 0


def cmd_analyze(a) -> int:
    import json

    from embedpin.analysis import analysis_for, table
    from embedpin.reports.builder import rebuild

    result, measured = analysis_for(a.run, device=a.device, again=a.again)
    if measured:
        rebuild(Path(a.run))  # the run page shows the table
    print(json.dumps(result.to_json(), indent=1) if a.json else table(result))
    return 0


def cmd_models(a) -> int:
    from embedpin.models.loader import describe_builtin, load_components

    print("built-in models:")
    print("  " + describe_builtin())
    print("also accepted by --model: a diffusers model folder, a Hugging Face hub id (the cache's copy, else "
          "downloaded), or a single-file .safetensors checkpoint (SD 1.x, SD 2.x, SDXL base: configs shipped)")
    if a.model:
        comp = load_components(a.model, clip=a.clip, model_config=a.model_config)
        print(f"{a.model}: {comp.describe()}")
        if comp.config_note:
            print(f"  loaded with the {comp.config_note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from embedpin.version import __version__

    p = _Parser(prog="embedpin", description="Pin a diffusion model's prompt conditioning to a visual target "
                "(CMA-ES over image guidance and embedding deltas, scored by ꟻLIP and CLIP).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"embedpin {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _optimize_parser(sub).set_defaults(fn=cmd_optimize)
    r = sub.add_parser("render", help="render a pinned result (run folder or pinned .safetensors)")
    r.add_argument("source", help="run folder or pinned.safetensors")
    r.add_argument("--seed", type=int, default=0, help="first seed")
    r.add_argument("-n", type=int, default=8, help="number of images")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    r.add_argument("--device", default="auto")
    r.add_argument("--model", default=None, help="render with this model instead of the run's (the same family: a "
                   "fine-tune, another copy of the checkpoint)")
    r.add_argument("--model-config", default=None, help="configs for a single-file --model (a shipped config's name "
                   "or a diffusers folder; default: chosen from the file)")
    r.add_argument("--image", default=None, metavar="PATH",
                   help="instead: re-render this image of the run's report exactly, at full size (its path inside "
                        "the run folder, shown in the report's tooltips, e.g. generations/0003/images/c04_i02.webp)")
    r.add_argument("-o", "--out", required=True, help="output folder")
    r.set_defaults(fn=cmd_render)
    e = sub.add_parser("export", help="export a run's pinned conditioning")
    e.add_argument("run", help="run folder")
    e.add_argument("--format", required=True, choices=["diffusers", "textual-inversion"])
    e.add_argument("-o", "--output", required=True, help="output .safetensors file")
    e.add_argument("--token", default="<pinned>", help="placeholder token name for textual inversion")
    e.set_defaults(fn=cmd_export)
    rp = sub.add_parser("report", help="rebuild a run's HTML report from its store")
    rp.add_argument("run")
    rp.set_defaults(fn=cmd_report)
    an = sub.add_parser("analyze", help="which prompt tokens lock the pinned result in: per token its pinned weight, "
                        "the search's spread along it and the effect of removing, zeroing and doubling it on the "
                        "validation seeds (3 renders of the validation seeds per token)")
    an.add_argument("run", help="run folder (finished or stopped)")
    an.add_argument("--json", action="store_true", help="print the rows as JSON")
    an.add_argument("--again", action="store_true", help="measure again even if the run folder has this "
                    "generation's table (analysis.json)")
    an.add_argument("--device", default="auto")
    an.set_defaults(fn=cmd_analyze)
    m = sub.add_parser("models", help="list the built-in model; check a --model argument")
    m.add_argument("--model", default=None, help="a --model argument to check: family, native size, prediction "
                   "type, text widths and image towers")
    m.add_argument("--clip", action="append", default=None, help="an image CLIP model folder or hub id "
                   "(repeatable)")
    m.add_argument("--model-config", default=None, help="configs for a single-file checkpoint: a shipped config's name "
                   "(sd15, sd21, sd21-base, sdxl-base), a diffusers folder or a hub id (default: chosen from the file)")
    m.set_defaults(fn=cmd_models)
    return p


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if not getattr(a, "fn", None):
            build_parser().print_help()
            return 0
        return a.fn(a)
    except EmbedpinError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
