"""The diffusers scheduler behind each sampler name a user can choose (the names:
:data:`embedpin.config.SCHEDULERS`, where the CLI's --help and argument checks read them
without loading the model stack)."""

from __future__ import annotations

from typing import Any

from embedpin.config import SCHEDULERS
from embedpin.errors import ConfigError

# Each of config.SCHEDULERS -> diffusers class name (+ config overrides); tests/test_settings.py checks the keys.
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++sde": ("DPMSolverSDEScheduler", {}),
    "dpm++sde-karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def check_scheduler(name: str) -> str:
    """``name`` if it is one of :data:`embedpin.config.SCHEDULERS`, else the one ConfigError library
    callers get (a run's config is checked before, by RunConfig.validate)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of: {', '.join(sorted(SCHEDULERS))}")
    return name
