"""The Python API, for notebooks and scripts: the CLI's commands as functions.

    import embedpin
    result = embedpin.optimize(target="star.png", prompt="a star", generations=8)
    result.run_dir, result.validation_loss, result.pinned["prompt_embeds"]
    embedpin.export(result.run_dir, format="textual-inversion", output="pinned.safetensors")

``optimize``'s keywords are the ``embedpin optimize`` long flags with underscores
(``validation_seeds=16`` is ``--validation-seeds 16``, ``no_hyperbatch=True`` is
``--no-hyperbatch``), or the config's field names (``n_vectors``, ``targets``); ``config=``
is ``--config``. Each value is converted and checked as its flag's words are (both come from
the settings declared in :mod:`embedpin.config`), so the same inputs give the same
``config.toml``, the same defaults and the same validation messages through either door. Errors are
:class:`embedpin.errors.EmbedpinError` subclasses (the CLI prints them as ``error: ...``).
The stages are imported inside the functions, so ``import embedpin`` stays light.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from embedpin.config import PLACEHOLDER, SCALE, SETTINGS, RunConfig, ScaleConfig, settings_from_keywords
from embedpin.errors import ConfigError
from embedpin.store import PINNED

SCALE_SETTINGS = {s.key for s in SETTINGS if s.section == SCALE}  # where it renders (ScaleConfig)


def run_config(config: str | Path | None = None, **settings: Any) -> RunConfig:
    """The validated :class:`~embedpin.config.RunConfig` that ``optimize(**settings)`` runs:
    the defaults, then the ``config`` TOML file's, then ``settings`` (None: the default)."""
    return RunConfig.from_settings(settings_from_keywords(settings), config)


def scale_config(config: str | Path | None = None, **settings: Any) -> ScaleConfig:
    """The validated :class:`~embedpin.config.ScaleConfig` (``workers``, ``ray_address``, ...) of
    ``optimize(**settings)`` / ``resume(..., **settings)``; ``ray_address`` defaults to $RAY_ADDRESS."""
    return ScaleConfig.from_settings(settings_from_keywords(settings))


def _with_pinned(result):
    from embedpin.exports import load_pinned

    path = Path(result.run_dir) / PINNED
    return dataclasses.replace(result, pinned=load_pinned(path)[0] if path.is_file() else None)


def optimize(target=None, prompt: str | None = None, *, quiet: bool = True, **settings):
    """Run a pinning search, as ``embedpin optimize`` does; returns the
    :class:`~embedpin.runner.RunResult` (``run_dir``, ``best_loss``, ``validation_loss``,
    ``plain_validation_loss``, …) with ``pinned``: the pinned tensors (``prompt_embeds``, …).
    ``target``: an image path, a folder, or a list of them (None: self mode). ``workers=N`` /
    ``ray_address=...`` render on Ray workers (``--workers``, ``--ray-address``)."""
    from embedpin.runner import run
    from embedpin.terminal import Terminal

    settings = dict(target=target, prompt=prompt, **settings)
    config, scale = run_config(**settings), scale_config(**settings)
    return _with_pinned(run(config, scale=scale, hooks=Terminal(quiet)))


def resume(run_dir: str | Path, *, quiet: bool = True, **scale):
    """Continue a stopped run from its last committed generation (``embedpin optimize --resume``);
    ``scale``: ``workers``, ``ray_address``, ``worker_timeout``, ``worker_restarts`` (any number of
    workers gives the same result)."""
    from embedpin.runner import resume as resume_run
    from embedpin.terminal import Terminal

    unknown = set(scale) - SCALE_SETTINGS
    if unknown:
        raise ConfigError(f"unknown setting(s) for resume: {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(sorted(SCALE_SETTINGS))}")
    return _with_pinned(resume_run(run_dir, scale=scale_config(**scale), hooks=Terminal(quiet)))


def load_pinned(path: str | Path):
    """(tensors, recipe) of a run folder's or a pinned file's result."""
    from embedpin.exports import load_pinned as load

    return load(path)


def export(run_dir: str | Path, format: str = "diffusers", output: str | Path = PINNED,
           token: str = PLACEHOLDER) -> Path:
    """Write a run's pinned result as ``diffusers`` embeddings or a ``textual-inversion`` file
    (``embedpin export``); returns the file written."""
    from embedpin.exports import export_run

    done = export_run(run_dir, format, output, token=token)
    if done.lost:
        warnings.warn(f"the embedding alone does not carry the run's {', '.join(done.lost)} (they are in its "
                      "metadata); format='diffusers' is the exact pinned result", stacklevel=2)
    return done.path
