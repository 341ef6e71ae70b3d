"""The Python API, for notebooks and scripts: the CLI's commands as functions.

    import embedpin
    result = embedpin.optimize(target="star.png", prompt="a star", generations=8)
    result.run_dir, result.validation_loss, result.pinned["prompt_embeds"]
    embedpin.export(result.run_dir, format="textual-inversion", output="pinned.safetensors")

``optimize``'s keywords are the ``embedpin optimize`` long flags with underscores
(``validation_seeds=16`` is ``--validation-seeds 16``). They are turned into that command
line and parsed by the CLI's own parser, so the same inputs give the same ``config.toml``,
the same defaults and the same validation messages through either door. Errors are
:class:`embedpin.errors.EmbedpinError` subclasses (the CLI prints them as ``error: ...``).
The stages are imported inside the functions, so ``import embedpin`` stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path
from typing import Any

from embedpin.errors import ConfigError
from embedpin.store import PINNED

_NOT_SETTINGS = {"help", "resume", "json", "quiet"}  # CLI flags that are not run settings
SCALE_SETTINGS = {"workers", "ray_address", "worker_timeout", "worker_restarts"}  # where it renders (ScaleConfig)


def _optimize_actions() -> dict[str, argparse.Action]:
    from embedpin.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["optimize"]._actions if a.dest not in _NOT_SETTINGS}


def _words(value: Any) -> list[str]:
    """One value or several (list, tuple) as command-line words."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values]


def optimize_argv(settings: dict[str, Any]) -> list[str]:
    """``optimize`` keywords -> the equivalent ``embedpin optimize`` arguments.

    None means "the default" (the flag is left out); repeatable flags (--target, --guide)
    take a list; --blocks takes a list or a comma-separated string; on/off flags a bool."""
    actions = _optimize_actions()
    argv = ["optimize"]
    for key, value in settings.items():
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"unknown setting {key!r}; the settings are embedpin optimize's long flags "
                              f"with underscores: {', '.join(sorted(actions))}")
        if value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true
            argv += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            for word in _words(value):
                argv += [flag, word]
        elif key == "blocks" and isinstance(value, (list, tuple)):
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _parse(settings: dict[str, Any]) -> argparse.Namespace:
    from embedpin.cli import build_parser

    return build_parser().parse_args(optimize_argv(settings))


def run_config(**settings):
    """The validated :class:`~embedpin.config.RunConfig` that ``optimize(**settings)`` runs."""
    from embedpin.cli import config_from_args

    return config_from_args(_parse(settings))


def scale_config(**settings):
    """The validated :class:`~embedpin.config.ScaleConfig` (``workers``, ``ray_address``, ...) of
    ``optimize(**settings)`` / ``resume(..., **settings)``; ``ray_address`` defaults to $RAY_ADDRESS."""
    from embedpin.cli import scale_from_args

    return scale_from_args(_parse(settings))


def _with_pinned(result):
    from embedpin.pinned import load_pinned

    path = Path(result.run_dir) / PINNED
    return dataclasses.replace(result, pinned=load_pinned(path)[0] if path.is_file() else None)


def optimize(target=None, prompt: str | None = None, *, quiet: bool = True, **settings):
    """Run a pinning search, as ``embedpin optimize`` does; returns the
    :class:`~embedpin.runner.RunResult` (``run_dir``, ``best_loss``, ``validation_loss``,
    ``plain_validation_loss``, …) with ``pinned``: the pinned tensors (``prompt_embeds``, …).
    ``target``: an image path, a folder, or a list of them (None: self mode). ``workers=N`` /
    ``ray_address=...`` render on Ray workers (``--workers``, ``--ray-address``)."""
    from embedpin.cli import config_from_args, scale_from_args
    from embedpin.runner import run

    args = _parse(dict(target=target, prompt=prompt, **settings))
    return _with_pinned(run(config_from_args(args), quiet=quiet, scale=scale_from_args(args)))


def resume(run_dir: str | Path, *, quiet: bool = True, **scale):
    """Continue a stopped run from its last committed generation (``embedpin optimize --resume``);
    ``scale``: ``workers``, ``ray_address``, ``worker_timeout``, ``worker_restarts`` (any number of
    workers gives the same result)."""
    from embedpin.runner import resume as resume_run

    unknown = set(scale) - SCALE_SETTINGS
    if unknown:
        raise ConfigError(f"unknown setting(s) for resume: {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(sorted(SCALE_SETTINGS))}")
    return _with_pinned(resume_run(run_dir, quiet=quiet, scale=scale_config(**scale)))


def load_pinned(path: str | Path):
    """(tensors, recipe) of a run folder's or a pinned file's result."""
    from embedpin.pinned import load_pinned as load

    return load(path)


def export(run_dir: str | Path, format: str = "diffusers", output: str | Path = "pinned.safetensors",
           token: str = "<pinned>") -> Path:
    """Write a run's pinned result as ``diffusers`` embeddings or a ``textual-inversion`` file
    (``embedpin export``); returns the file written."""
    from embedpin.pinned import export_run

    done = export_run(run_dir, format, output, token=token)
    if done.lost:
        warnings.warn(f"the embedding alone does not carry the run's {', '.join(done.lost)} (they are in its "
                      "metadata); format='diffusers' is the exact pinned result", stacklevel=2)
    return done.path
