"""Load every model part a run needs from one ``--model`` argument.

Accepted: ``micro`` (built in), a diffusers model folder, a Hugging Face hub id (the local
cache's copy, else downloaded: ``models.hub``), or a single-file ``.safetensors`` checkpoint
(A1111 style: loaded with the configs shipped for its family, ``models.checkpoint``). Pickle
checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused: loading one runs code.

The only network access is ``models.hub``'s download of a hub id that is not cached; every
library load passes ``local_files_only=True``. diffusers, transformers and huggingface_hub are
imported inside the loaders, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from embedpin.errors import ModelError
from embedpin.models.components import OPENAI_MEAN, OPENAI_STD, Components, ImageTower
from embedpin.models.hub import CLIP_FILES, fetch

MICRO_DIR = Path(__file__).parent / "micro" / "weights"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def quiet_libraries():
    """The libraries' own loading messages and progress bars off (a download's bars stay on)."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def resolve(spec: str) -> tuple[str, Path]:
    """Classify a ``--model`` argument: ('micro'|'folder'|'single-file', path). Raises ModelError."""
    if spec == "micro":
        if not (MICRO_DIR / "model_index.json").is_file():
            raise ModelError("the built-in micro model is missing from this install; "
                             "rebuild it with: python -m embedpin.models.micro.train")
        return "micro", MICRO_DIR
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{spec}: pickle checkpoints are refused (loading one can run arbitrary code); "
                         "convert it to .safetensors first, e.g. with diffusers' convert scripts on a "
                         "machine you trust")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"{spec}: not a model: expected a diffusers folder, a hub id or a .safetensors file")
        return "single-file", path
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{spec}: not a diffusers model folder (no model_index.json)")
        return "folder", path
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return "folder", fetch(spec)
    raise ModelError(f"{spec}: no such model: not 'micro', an existing folder or file, or a hub id")


def _load(what: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the {what}: {first}") from None


def _tower(folder: Path, clip) -> ImageTower:
    """The model with its preprocessing (``preprocessor_config.json``, else OpenAI's)."""
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return ImageTower(clip, int(clip.config.vision_config.image_size), mean, std)


def load_clip(spec: str | Path | None, fallback_folder: Path | None = None) -> ImageTower | None:
    """An image tower: a ``CLIPModel`` from a folder / hub id, or from ``<model>/clip``
    (None when neither is there)."""
    from transformers import CLIPModel

    folder = None
    if spec is not None:
        p = Path(spec).expanduser()
        folder = p if p.is_dir() else (fetch(str(spec), CLIP_FILES) if HUB_ID.match(str(spec)) else None)
        if folder is None:
            raise ModelError(f"{spec}: no such CLIP model folder or hub id")
    elif fallback_folder is not None and (fallback_folder / "clip" / "config.json").is_file():
        folder = fallback_folder / "clip"
    if folder is None:
        return None
    if _shares_text_tower(folder):
        clip = _load("CLIP model", _clip_with_shared_text, folder).eval()
    else:
        clip = _load("CLIP model", CLIPModel.from_pretrained, folder, local_files_only=True).eval()
    return _tower(folder, clip)


TEXT_PREFIX = "text_model."


def _shares_text_tower(folder: Path) -> bool:
    """True for a ``<model>/clip`` folder saved by :func:`save_clip_shared`: weights without
    the text tower, which is the sibling ``text_encoder`` (the micro model stores it once)."""
    from safetensors import safe_open

    weights, text = folder / "model.safetensors", folder.parent / "text_encoder" / "model.safetensors"
    if not (weights.is_file() and text.is_file()):
        return False
    try:
        with safe_open(str(weights), "pt") as f:
            return not any(k.startswith(TEXT_PREFIX) for k in f.keys())
    except Exception:  # unreadable: let the normal loader report it
        return False


def _clip_with_shared_text(folder: Path):
    """CLIPModel from ``folder``'s image tower + projections and ``../text_encoder``'s weights."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    state = load_file(str(folder / "model.safetensors"))
    text = load_file(str(folder.parent / "text_encoder" / "model.safetensors"))
    state.update({k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in text.items()})
    clip = CLIPModel(CLIPConfig.from_pretrained(folder, local_files_only=True))
    missing, unexpected = clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"CLIP weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return clip


def save_clip_shared(clip, folder: Path) -> None:
    """Save a CLIPModel whose text tower is the pipeline's ``text_encoder`` without that tower
    (config + image tower + projections; :func:`load_clip` joins them again)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    clip.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items() if not k.startswith(TEXT_PREFIX)}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load_folder(folder: Path, name: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = dict(
        tokenizer=_load("tokenizer", CLIPTokenizer.from_pretrained, folder / "tokenizer", local_files_only=True),
        text_encoder=_load("text encoder", CLIPTextModel.from_pretrained, folder / "text_encoder",
                           local_files_only=True),
        unet=_load("UNet", UNet2DConditionModel.from_pretrained, folder / "unet", local_files_only=True),
        vae=_load("VAE", AutoencoderKL.from_pretrained, folder / "vae", local_files_only=True),
        scheduler_config=_load("scheduler config", _read_json, folder / "scheduler" / "scheduler_config.json"),
    )
    if (folder / "text_encoder_2").is_dir():  # SDXL: second encoder with pooled output
        from transformers import CLIPTextModelWithProjection

        parts["tokenizer_2"] = _load("tokenizer 2", CLIPTokenizer.from_pretrained, folder / "tokenizer_2",
                                     local_files_only=True)
        parts["text_encoder_2"] = _load("text encoder 2", CLIPTextModelWithProjection.from_pretrained,
                                        folder / "text_encoder_2", local_files_only=True)
        index = _load("model index", _read_json, folder / "model_index.json")
        parts["zero_empty_negative"] = bool(index.get("force_zeros_for_empty_prompt", True))
    return parts


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder from its configs alone (no weights read): SDXL (a
    second text encoder), SD 2.x (v-prediction or a 1024-wide text encoder) or SD 1.x."""
    if (folder / "text_encoder_2" / "config.json").is_file():
        return "SDXL"
    try:
        width = _read_json(folder / "text_encoder" / "config.json").get("hidden_size")
        prediction = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type")
    except (OSError, ValueError):
        raise ModelError(f"{folder}: not a diffusers model folder (no text_encoder / scheduler config)") from None
    return "SD 2.x" if prediction == "v_prediction" or width == 1024 else "SD 1.x"


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype) -> dict:
    """A single-file checkpoint with the shipped config of its family (``models.checkpoint``), or
    with ``--model-config``: a shipped config's name, a diffusers folder or a hub id of the
    same family."""
    from embedpin.models.checkpoint import SHIPPED, load_checkpoint, read_weights

    if config and config not in SHIPPED:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            if not HUB_ID.match(config):
                raise ModelError(f"--model-config {config}: not a shipped config ({', '.join(SHIPPED)}), a folder "
                                 "or a hub id")
            folder = fetch(config)
        family, found = read_weights(path).family, folder_family(folder)
        if found != family:
            raise ModelError(f"{path.name} is an {family} checkpoint but the config folder {folder} is {found}: "
                             f"pass --model-config with a diffusers folder of the {family} family (or leave it out: "
                             f"embedpin ships the {family} configs)")
        config = str(folder)
    return _load("checkpoint " + path.name, load_checkpoint, path, dtype, config)


def load_components(spec: str = "micro", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    clip: str | list[str] | None = None, model_config: str | None = None) -> Components:
    """Load tokenizer, text encoder(s), UNet, VAE, scheduler config and the image towers
    (each ``clip`` folder / cached id, in order; none given: the model's own ``clip/``) on
    device / dtype (:meth:`Components.to`)."""
    quiet_libraries()
    kind, path = resolve(spec)
    parts = _load_single_file(path, model_config, dtype) if kind == "single-file" else _load_folder(path, spec)
    specs = [clip] if isinstance(clip, (str, Path)) else list(clip or [])
    fallback = path if kind != "single-file" else None
    towers = [load_clip(s) for s in specs] if specs else [load_clip(None, fallback)]
    comp = Components(name=spec, source=str(path), towers=tuple(t for t in towers if t is not None), **parts)
    for m in (*comp.text_encoders, comp.unet, comp.vae, *(t.model for t in comp.towers)):
        m.eval().requires_grad_(False)
    comp.to(device, dtype)
    return comp


def describe_builtin() -> str:
    info = MICRO_DIR / "train_info.json"
    status = "trained" if (MICRO_DIR / "model_index.json").is_file() else "MISSING"
    extra = ""
    if info.is_file():
        extra = f", seed {json.loads(info.read_text()).get('seed')}"
    return f"micro  (built in, default; 64x64 shapes model, {status}{extra}): {MICRO_DIR}"
