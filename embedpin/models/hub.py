"""Hugging Face hub ids, as the ecosystem treats them: the local cache's copy when there is one,
else a download of the parts a run loads (as diffusers downloads a pipeline: its components'
configs, tokenizers and safetensors weights; no safety checker, no other precision or framework,
no pickle), with huggingface_hub's progress bars on stderr. With ``HF_HUB_OFFLINE=1`` nothing is
downloaded: a missing id is one error naming the ``hf download`` command that fetches exactly
these files. ``HF_ENDPOINT`` and ``HF_HOME`` / ``HF_HUB_CACHE`` are honoured, as huggingface_hub
honours them.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from pathlib import Path

from embedpin.errors import ModelError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
# a diffusers pipeline: what embedpin loads of it (sharded weights included), and its own image tower
MODEL_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
               *(p for c in COMPONENTS for p in (f"{c}/*.json", f"{c}/{WEIGHTS.get(c, 'model')}*.safetensors")),
               "clip/*.json", "clip/model*.safetensors")
# an image CLIP repository: its configs, tokenizer files and safetensors weights
CLIP_FILES = ("*.json", "*.txt", "model*.safetensors")
# other precisions and training copies that match the weight patterns above
SKIP = ("*.fp16.*", "*.bf16.*", "*non_ema*", "*.ema.*")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _progress_bars():
    """huggingface_hub's progress bars on for a download (the loaders turn the libraries' bars off),
    unless the user turned them off (HF_HUB_DISABLE_PROGRESS_BARS)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    if not constants.HF_HUB_DISABLE_PROGRESS_BARS:
        enable_progress_bars()
    try:
        yield
    finally:
        if was_off:
            disable_progress_bars()


def download_command(repo_id: str, patterns: tuple[str, ...]) -> str:
    """The ``hf download`` command that fetches what :func:`fetch` would."""
    words = ["hf", "download", repo_id]
    for p in patterns:
        words += ["--include", p]
    for p in SKIP:
        words += ["--exclude", p]
    return shlex.join(words)


def fetch(repo_id: str, patterns: tuple[str, ...] = MODEL_FILES) -> Path:
    """The local folder of hub id ``repo_id``: the cached snapshot, else downloaded (see the module
    doc). Raises ModelError (one line) when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), ignore_patterns=list(SKIP),
                                      local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends): download it
        pass
    if offline():
        raise ModelError(f"{repo_id} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                         f"forbids downloading it; fetch it with: {download_command(repo_id, patterns)}")
    try:
        with _progress_bars():
            return Path(snapshot_download(repo_id, allow_patterns=list(patterns), ignore_patterns=list(SKIP)))
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated on the hub: accept its licence on its page and log in "
                         "(hf auth login), then run again") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo_id}: no such repository on the hub (or it is private: hf auth login)") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot download {repo_id}: {first}") from None
