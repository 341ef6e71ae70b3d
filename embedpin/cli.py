"""The ``embedpin`` command: optimize (and --resume), render, export, report, models.

A user mistake ends with one line ``error: ...`` on stderr and exit code 2; Ctrl-C
during a run leaves a resumable run and exits with 130.

Each command imports its stage inside its handler: ``embedpin --help`` and argument errors
answer without importing torch, diffusers or transformers (seconds each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embedpin.config import PLACEHOLDER
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


def _flag_type(s):
    """argparse's ``type`` for a setting: its own conversion (the API keywords' too)."""
    def convert(text: str):
        try:
            return s.convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = s.name
    return convert


def _add_setting(g, s) -> None:
    """The flag of one declared setting (embedpin.config.Setting), default None: not given."""
    if s.kind == "switch":
        g.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction, default=None, help=s.help_text())
    elif s.kind == "off":
        g.add_argument(s.flag, dest=s.key, action="store_true", default=None, help=s.help_text())
    else:
        metavar = s.metavar or ("{" + ",".join(s.choices) + "}" if s.choices else None)
        g.add_argument(s.flag, dest=s.key, type=_flag_type(s), default=None, metavar=metavar, help=s.help_text(),
                       action="append" if s.kind == "append" else "store")


def _optimize_parser(sub):
    """``optimize``: a flag per declared setting (embedpin.config.FLAGGED), in its help group,
    and the flags that are not settings."""
    from embedpin.config import FLAGGED, GROUPS

    p = sub.add_parser("optimize", help="pin a prompt's conditioning to target image(s)")  # (each help text states its default)
    for name, title in GROUPS.items():
        g = p.add_argument_group(title)
        if name == "run":
            g.add_argument("--config", default=None, metavar="FILE.toml", help="read settings from a TOML config first")
        for s in FLAGGED:
            if s.group == name:
                _add_setting(g, s)
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run")
    g.add_argument("--json", action="store_true", help="print one JSON summary object last")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _given(a) -> dict:
    """The settings given on the command line (Setting -> value; None: not given)."""
    from embedpin.config import FLAGGED

    return {s: getattr(a, s.key) for s in FLAGGED}


def cmd_optimize(a) -> int:
    from embedpin.config import RunConfig, ScaleConfig

    given = _given(a)  # defaults, then --config, then the flags; argument errors answer before torch is imported
    config = None if a.resume else RunConfig.from_settings(given, a.config)
    scale = ScaleConfig.from_settings(given)
    from embedpin.runner import resume, run
    from embedpin.terminal import Terminal

    hooks = Terminal(a.quiet)
    result = resume(a.resume, scale=scale, hooks=hooks) if a.resume else run(config, scale=scale, hooks=hooks)
    if a.json:
        print(json.dumps(result.summary()))
    elif not a.quiet:
        print(result.describe())
    return 130 if result.interrupted else 0


def cmd_render(a) -> int:
    from embedpin.exports import render_image, render_pinned

    if a.image:
        print(f"wrote {render_image(a.source, a.image, a.out, device=a.device)}")
        return 0
    paths = render_pinned(a.source, seed=a.seed, n=a.n, out=a.out, steps=a.steps, device=a.device, model=a.model,
                          model_config=a.model_config)
    print(f"wrote {len(paths)} image(s) to {a.out}")
    return 0


def cmd_export(a) -> int:
    from embedpin.exports import export_run

    done = export_run(a.run, a.format, a.output, token=a.token)
    print("\n".join(done.describe()))
    if done.lost:
        print(f"note: the embedding alone renders '{done.usage}' without the run's {', '.join(done.lost)} "
              "(a textual-inversion file cannot carry them; they are in its metadata). "
              "For the exact pinned result use --format diffusers.", file=sys.stderr)
    return 0


def cmd_report(a) -> int:
    from embedpin.reports.builder import rebuild
    from embedpin.store import PAGE, RunStore

    store = RunStore.open(a.run)
    rebuild(store.root)
    print(f"wrote {store.root / PAGE}")
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


def _render_parser(sub) -> None:
    """``embedpin render``: a pinned result on new seeds, or one image of the report again."""
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


def _export_parser(sub) -> None:
    """``embedpin export``: the pinned conditioning for diffusers or as a textual inversion."""
    e = sub.add_parser("export", help="export a run's pinned conditioning")
    e.add_argument("run", help="run folder")
    e.add_argument("--format", required=True, choices=["diffusers", "textual-inversion"])
    e.add_argument("-o", "--output", required=True, help="output .safetensors file")
    e.add_argument("--token", default=PLACEHOLDER, help="placeholder token name for textual inversion")
    e.set_defaults(fn=cmd_export)


def _inspect_parsers(sub) -> None:
    """``embedpin report``, ``analyze`` and ``models``: look at a run or a model."""
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


def build_parser() -> argparse.ArgumentParser:
    """The ``embedpin`` command and its subcommands (optimize's flags from the config's settings)."""
    from embedpin.version import __version__

    p = _Parser(prog="embedpin", description="Pin a diffusion model's prompt conditioning to a visual target "
                "(textual inversion by the model's gradient, then CMA-ES over token vectors, image guidance and "
                "embedding deltas, scored by ꟻLIP and CLIP on seeds the search never saw).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"embedpin {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _optimize_parser(sub).set_defaults(fn=cmd_optimize)
    _render_parser(sub)
    _export_parser(sub)
    _inspect_parsers(sub)
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
