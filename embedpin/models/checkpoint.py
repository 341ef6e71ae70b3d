"""Single-file checkpoints (the original LDM / SGM layout that A1111, Forge and ComfyUI users
keep) loaded with the model-family configs shipped in ``models/families/``: no cache, no network.

Which config: the text encoders' layout and widths and the UNet's widths (model channels,
cross-attention width, pooled-input width, linear or convolutional attention projections) must be
those of a shipped family; the depths (UNet levels, resnets per level, transformer blocks, text
layers) are counted from the file, as the original loaders and ComfyUI read them, so a cut-down
model of a family's widths loads too. The prediction type is the file's word where it gives one (a
``v_pred`` key, or ``modelspec.prediction_type`` / ``modelspec.architecture`` metadata), else the
config's: SD 2.x files rarely say, and the 768 px v-prediction model (SD 2.1) is assumed for them
(``--model-config sd21-base`` picks the 512 px epsilon one). Attention upcast (SD 2.1) and VAE
upcast (SDXL) follow the chosen config.

Every shape is checked against the config on the meta device before a weight is read, and the
first thing that does not fit is named in one line. Weights in memory (ComfyUI's loaded model)
go through the same path and are used in place, not copied (:func:`components_from_weights`).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedpin.errors import ModelError

FAMILIES_DIR = Path(__file__).parent / "families"
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
OPEN_CLIP = ("cond_stage_model.model.", "conditioner.embedders.1.model.")
REFINER = "conditioner.embedders.0.model."
FLAGS = ("v_pred",)  # keys that mark a v-prediction model (A1111's and ComfyUI's convention)


@dataclass(frozen=True)
class Shipped:
    """A shipped config: its folder under ``families/``, family, and where its facts are published."""
    name: str
    family: str
    source: str
    summary: str

    @property
    def folder(self) -> Path:
        return FAMILIES_DIR / self.name


SHIPPED = {s.name: s for s in (
    Shipped("sd15", "SD 1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5", "512 px, epsilon"),
    Shipped("sd21", "SD 2.x", "stabilityai/stable-diffusion-2-1", "768 px, v-prediction"),
    Shipped("sd21-base", "SD 2.x", "stabilityai/stable-diffusion-2-1-base", "512 px, epsilon"),
    Shipped("sdxl-base", "SDXL", "stabilityai/stable-diffusion-xl-base-1.0", "1024 px, epsilon"),
)}
DEFAULT_SHIPPED = {"SD 1.x": "sd15", "SD 2.x": "sd21", "SDXL": "sdxl-base"}
TEXT_NAMES = ("text_encoder", "text_encoder_2")


@dataclass
class Weights:
    """A checkpoint's parts, keys without their prefixes: the UNet and VAE in LDM names, each text
    encoder in transformers' names (``embeddings.*``, ``encoder.layers.*``, ``final_layer_norm.*``,
    ``text_projection.weight``), in conditioning order. Values are tensors, or meta tensors of the
    file's shapes when only the header was read."""
    family: str
    unet: dict
    vae: dict
    texts: list[dict]
    metadata: dict = field(default_factory=dict)
    flags: set = field(default_factory=set)  # top-level marker keys (FLAGS)
    text_where: tuple[str, ...] = ()          # each text encoder's prefix in the file


@dataclass
class Choice:
    """The configs a checkpoint loads with: the shipped (or given) family configs with the depths
    counted from the file and the file's prediction type, and why."""
    family: str
    configs: dict          # component -> config dict (unet, vae, text_encoder[_2], scheduler, model_index)
    tokenizers: list       # tokenizer folders, one per text encoder (shipped ones hold only their config)
    reasons: list[str]
    source: str            # "shipped config sd15 (...)" or the --model-config folder

    def describe(self) -> str:
        return f"{self.source}: " + "; ".join(self.reasons)


# ---------------------------------------------------------------------------------------------
# reading a file's header and splitting it into parts


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """{key: shape} and the metadata of a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _flat_clip(state: dict) -> dict:
    """A CLIP text model's keys without ``text_model.`` (old SD 1.x files lack it already)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}


def _from_open_clip(state: dict, prefix: str) -> dict:
    """OpenCLIP's text tower (``resblocks`` with fused q/k/v, a transposed projection) in
    transformers' names; the fused q/k/v become three views of it, nothing is copied."""
    out = {}
    for key, t in _strip(state, prefix).items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)", key)
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = t
        elif key == "text_projection":
            out["text_projection.weight"] = t.T
        elif m and m[2] == "attn.in_proj":
            for x, part in zip("qkv", t.chunk(3)):
                out[f"encoder.layers.{m[1]}.self_attn.{x}_proj.{m[3]}"] = part
        elif m and m[2] in OPEN_CLIP_BLOCK:
            out[f"encoder.layers.{m[1]}.{OPEN_CLIP_BLOCK[m[2]]}.{m[3]}"] = t
        elif key not in ("logit_scale", "attn_mask"):
            out[key] = t  # unknown: named by the fit check
    return out


def _count(state: dict, prefix: str) -> int:
    """How many numbered blocks ``prefix{i}.`` there are (0, 1, 2, ...)."""
    found = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    n = 0
    while n in found:
        n += 1
    return n


def split_checkpoint(state: dict, name: str, metadata: dict | None = None) -> Weights:
    """A checkpoint's state dict (tensors or meta tensors, original layout) as :class:`Weights`."""
    keys = state.keys()
    if not any(k.startswith(UNET) for k in keys):
        raise ModelError(f"{name}: not a Stable Diffusion checkpoint embedpin knows (SD 1.x, SD 2.x, SDXL base): "
                         f"no UNet weights ({UNET}*)")
    if any(k.startswith(REFINER) for k in keys) and not any(k.startswith(OPEN_CLIP[1]) for k in keys):
        raise ModelError(f"{name} is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder): embedpin pins "
                         "base models (SD 1.x, SD 2.x, SDXL base); use the SDXL base checkpoint")
    if any(k.startswith(OPEN_CLIP[1]) for k in keys):
        family, where = "SDXL", (CLIP_L[1], OPEN_CLIP[1])
        texts = [_flat_clip(_strip(state, CLIP_L[1])), _from_open_clip(state, OPEN_CLIP[1])]
    elif any(k.startswith(OPEN_CLIP[0]) for k in keys):
        family, where = "SD 2.x", (OPEN_CLIP[0],)
        texts = [_from_open_clip(state, OPEN_CLIP[0])]
    elif any(k.startswith(CLIP_L[0]) for k in keys):
        family, where = "SD 1.x", (CLIP_L[0],)
        texts = [_flat_clip(_strip(state, CLIP_L[0]))]
    else:
        raise ModelError(f"{name}: no text encoder weights of a layout embedpin knows (cond_stage_model.transformer "
                         "for SD 1.x, cond_stage_model.model for SD 2.x, conditioner.embedders for SDXL)")
    for text, prefix in zip(texts, where):
        if "embeddings.token_embedding.weight" not in text:
            raise ModelError(f"{name}: its text encoder under {prefix.rstrip('.')} has no token embedding")
    vae = _strip(state, VAE)
    if not vae:
        raise ModelError(f"{name}: no VAE weights ({VAE}*); embedpin needs a checkpoint with its VAE baked in")
    flags = {k for k in FLAGS if k in keys}
    return Weights(family, _strip(state, UNET), vae, texts, dict(metadata or {}), flags, where)


def read_weights(path: Path, dtype: torch.dtype | None = None) -> Weights:
    """The checkpoint's parts: meta tensors of the file's shapes (``dtype`` None: header only), or
    its weights read as ``dtype`` (only the parts a model uses: no EMA copy, no training leftovers)."""
    shapes, metadata = read_header(path)
    if dtype is None:
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        return split_checkpoint(meta, path.name, metadata)
    from safetensors import safe_open

    wanted = (UNET, VAE, *CLIP_L, *OPEN_CLIP)
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.startswith(wanted) or k in FLAGS:
                t = f.get_tensor(k)
                state[k] = t.to(dtype) if t.is_floating_point() else t
    return split_checkpoint(state, path.name, metadata)


# ---------------------------------------------------------------------------------------------
# what the file's shapes say, and the configs that follow


def _shape(state: dict, key: str) -> tuple[int, ...] | None:
    t = state.get(key)
    return None if t is None else tuple(t.shape)


@dataclass
class UNetShape:
    """The UNet facts a config must agree with, counted from LDM keys."""
    model_channels: int       # the input convolution's
    channels: list[int]       # per level
    per_level: int            # resnets per down level
    attention: list[bool]     # a transformer in the level's blocks
    depth: list[int]          # transformer blocks per level (0 without)
    mid_depth: int
    context: int | None
    linear: bool
    adm: int | None
    in_channels: int
    out_channels: int


def unet_shape(state: dict, name: str) -> UNetShape:
    first = _shape(state, "input_blocks.0.0.weight")
    if first is None or _shape(state, "out.2.weight") is None:
        raise ModelError(f"{name}: its UNet has no input or output convolution (input_blocks.0.0, out.2)")
    blocks = _count(state, "input_blocks.")
    downs = [i for i in range(blocks) if f"input_blocks.{i}.0.op.weight" in state]
    per_level = (downs[0] if downs else blocks) - 1
    levels = len(downs) + 1
    if per_level < 1 or blocks != 1 + levels * per_level + len(downs):
        raise ModelError(f"{name}: its UNet's input blocks ({blocks}) do not form levels of resnets and downsamplers")
    heads = [1 + lv * (per_level + 1) for lv in range(levels)]
    channels = [_shape(state, f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in heads]
    depth = [_count(state, f"input_blocks.{i}.1.transformer_blocks.") for i in heads]
    k = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    proj = next((k for k in state if k.endswith(".proj_in.weight")), None)
    adm = _shape(state, "label_emb.0.0.weight")
    return UNetShape(first[0], channels, per_level, [d > 0 for d in depth], depth,
                     _count(state, "middle_block.1.transformer_blocks."), None if k is None else state[k].shape[1],
                     proj is not None and state[proj].dim() == 2, None if adm is None else adm[1], first[1],
                     _shape(state, "out.2.weight")[0])


def _published_unet(config: dict) -> UNetShape:
    """The same facts for a diffusers UNet config."""
    levels = len(config["block_out_channels"])
    attention = ["CrossAttn" in t for t in config["down_block_types"]]
    tl = config.get("transformer_layers_per_block", 1)
    tl = [tl] * levels if isinstance(tl, int) else list(tl)
    depth = [d if a else 0 for d, a in zip(tl, attention)]
    return UNetShape(config["block_out_channels"][0], list(config["block_out_channels"]), config["layers_per_block"],
                     attention, depth, tl[-1],
                     config["cross_attention_dim"], bool(config.get("use_linear_projection")),
                     config.get("projection_class_embeddings_input_dim"), config["in_channels"], config["out_channels"])


def _check_unet(found: UNetShape, want: UNetShape, name: str, family: str) -> None:
    """Raise naming the first of the file's UNet widths that is not the family's, or a depth that is
    not a cut of its published one."""
    levels = len(found.channels)
    widths = [("model channels", found.model_channels, want.model_channels),
              ("cross-attention width", found.context, want.context),
              ("pooled-input width (SDXL's size and text embedding)", found.adm, want.adm),
              ("latent channels in", found.in_channels, want.in_channels),
              ("latent channels out", found.out_channels, want.out_channels),
              ("linear attention projections", found.linear, want.linear)]
    for what, got, expected in widths:
        if got != expected:
            hint = " (an inpainting model: embedpin renders text-to-image models)" if what.endswith(" in") else ""
            raise ModelError(f"{name} fits no shipped config: its UNet's {what} is {got}, {family}'s is "
                             f"{expected}{hint}")
    if levels > len(want.channels) or found.channels != want.channels[:levels]:
        raise ModelError(f"{name} fits no shipped config: its UNet's level widths {found.channels} are not "
                         f"{family}'s {want.channels} (or the first of them)")
    if found.attention != want.attention[:levels] or found.per_level > want.per_level \
            or any(d > w for d, w in zip(found.depth, want.depth)):
        raise ModelError(f"{name} fits no shipped config: its UNet's blocks (resnets per level {found.per_level}, "
                         f"transformer blocks per level {found.depth}) are not a cut of {family}'s "
                         f"({want.per_level}, {want.depth[:levels]})")
    if found.mid_depth != (found.depth[-1] or 1):
        raise ModelError(f"{name} fits no shipped config: its UNet's middle block has {found.mid_depth} transformer "
                         f"blocks, its last level {found.depth[-1]}")


def _unet_config(published: dict, found: UNetShape, name: str, family: str) -> tuple[dict, list[str]]:
    """The published UNet config with the file's depth (and a note when it differs)."""
    want = _published_unet(published)
    _check_unet(found, want, name, family)
    levels, tl = len(found.channels), [d or 1 for d in found.depth]
    config = dict(published, block_out_channels=found.channels, layers_per_block=found.per_level,
                  down_block_types=published["down_block_types"][:levels],
                  up_block_types=published["up_block_types"][-levels:],
                  transformer_layers_per_block=tl if "transformer_layers_per_block" in published else tl[0])
    if isinstance(published["attention_head_dim"], list):
        config["attention_head_dim"] = published["attention_head_dim"][:levels]
    if (found.channels, found.per_level, found.depth) == (want.channels, want.per_level, want.depth):
        return config, []
    return config, [f"UNet depth from the file: levels {found.channels} (published {want.channels}), resnets per level "
                    f"{found.per_level} (published {want.per_level}), transformer blocks {found.depth} (published "
                    f"{want.depth})"]


def _text_config(published: dict, state: dict, name: str, family: str, which: str) -> tuple[dict, list[str]]:
    emb = _shape(state, "embeddings.token_embedding.weight")
    pos = _shape(state, "embeddings.position_embedding.weight")
    if emb is None or pos is None:
        raise ModelError(f"{name}: its {which} has no token or position embedding")
    layers = _count(state, "encoder.layers.")
    checks = [("width", emb[1], published["hidden_size"]), ("vocabulary", emb[0], published["vocab_size"]),
              ("positions", pos[0], published["max_position_embeddings"])]
    for what, got, expected in checks:
        if got != expected:
            raise ModelError(f"{name} fits no shipped config: its {which}'s {what} is {got}, {family}'s is {expected}")
    sd2 = family == "SD 2.x"
    if not 1 + sd2 <= layers <= published["num_hidden_layers"] + sd2:
        raise ModelError(f"{name} fits no shipped config: its {which} has {layers} layers, {family}'s "
                         f"{published['num_hidden_layers']}")
    used = layers - sd2  # SD 2.x conditions on the penultimate layer: its last is not part of the model
    notes = [] if used == published["num_hidden_layers"] else \
        [f"{which} layers from the file: {used} (published {published['num_hidden_layers']})"]
    return dict(published, num_hidden_layers=used), notes


def prediction_name(kind: str) -> str:
    """``v-prediction`` / ``epsilon prediction``: a scheduler's prediction type in words."""
    return "v-prediction" if kind == "v_prediction" else f"{kind} prediction"


PREDICTION_WORDS = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}
ARCHITECTURES = {"stable-diffusion-v2-768-v": "v_prediction", "stable-diffusion-v2-512": "epsilon"}  # (ModelSpec ids)


def file_prediction(weights: Weights) -> tuple[str | None, str]:
    """(prediction type, how the file says it) or (None, "")."""
    meta = weights.metadata
    word = PREDICTION_WORDS.get(str(meta.get("modelspec.prediction_type", "")).strip().lower())
    if word:
        return word, f"the file's metadata says modelspec.prediction_type={meta['modelspec.prediction_type']}"
    arch = str(meta.get("modelspec.architecture", ""))
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch], f"the file's metadata says modelspec.architecture={arch}"
    if "v_pred" in weights.flags:
        return "v_prediction", "the file has a v_pred key"
    return None, ""


COMPONENT_FILES = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}


def _read(folder: Path, component: str) -> dict:
    path = folder / COMPONENT_FILES.get(component, f"{component}/config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ModelError(f"{folder}: no readable {component} config ({path.relative_to(folder)}) in this config "
                         "folder") from None


def _shipped(weights: Weights, name: str, model_config: str | Path | None, predicted: str | None) -> Shipped | None:
    """The shipped config to load with (None: ``model_config`` is a folder): the one named, or the
    family's (SD 2.x: the epsilon 512 px one when the file says epsilon)."""
    if model_config is not None and str(model_config) not in SHIPPED:
        return None
    if model_config is None and weights.family == "SD 2.x" and predicted == "epsilon":
        return SHIPPED["sd21-base"]
    shipped = SHIPPED[str(model_config) if model_config else DEFAULT_SHIPPED[weights.family]]
    if shipped.family != weights.family:
        raise ModelError(f"{name} is an {weights.family} checkpoint; --model-config {shipped.name} is {shipped.family}")
    return shipped


def _prediction(configs: dict, weights: Weights, predicted: str | None, said: str, chosen: bool) -> str:
    """Set the file's prediction type into the scheduler config; the reason shown for it."""
    if predicted:
        configs["scheduler"] = dict(configs["scheduler"], prediction_type=predicted)
        return f"{prediction_name(predicted)}: {said}"
    if weights.family == "SD 2.x" and chosen:
        return ("v-prediction: assumed, the file does not say (SD 2.x's 768 px models are v-prediction; "
                "--model-config sd21-base loads it as the 512 px epsilon model)")
    return f"{prediction_name(configs['scheduler'].get('prediction_type', 'epsilon'))}: the config's"


def choose(weights: Weights, name: str, model_config: str | Path | None = None) -> Choice:
    """The configs ``weights`` load with: the shipped config of its family (or ``model_config``:
    a shipped config's name or a diffusers folder), the file's depths, the file's prediction type."""
    predicted, said = file_prediction(weights)
    shipped = _shipped(weights, name, model_config, predicted)
    folder = shipped.folder if shipped else Path(model_config)
    configs = {c: _read(folder, c) for c in ("model_index", "unet", "vae", "scheduler")}
    configs["unet"], notes = _unet_config(configs["unet"], unet_shape(weights.unet, name), name, weights.family)
    n_text = len(weights.texts)
    if (folder / "text_encoder_2").is_dir() != (n_text == 2):
        raise ModelError(f"{name} has {n_text} text encoder(s); the config folder {folder} has "
                         f"{1 + (folder / 'text_encoder_2').is_dir()}")
    for i, state in enumerate(weights.texts):
        which = "text encoder" if n_text == 1 else ("first", "second")[i] + " text encoder"
        configs[TEXT_NAMES[i]], more = _text_config(_read(folder, TEXT_NAMES[i]), state, name, weights.family, which)
        notes += more
    reasons = [_why(weights, configs), _prediction(configs, weights, predicted, said, model_config is None)]
    source = (f"shipped config {shipped.name} ({shipped.family}, {shipped.summary}, as {shipped.source} publishes it)"
              if shipped else f"configs of {folder}")
    return Choice(weights.family, configs, [folder / t for t in ("tokenizer", "tokenizer_2")[:n_text]],
                  reasons + notes, source)


def _why(weights: Weights, configs: dict) -> str:
    """The file's features that name its family."""
    widths = " + ".join(f"{c['hidden_size']}" for c in (configs[t] for t in TEXT_NAMES[:len(weights.texts)]))
    unet = configs["unet"]
    adm = unet.get("projection_class_embeddings_input_dim")
    encoders = "a text encoder under " if len(weights.texts) == 1 else "text encoders under "
    return (f"the checkpoint has {encoders}{' and '.join(w.rstrip('.') for w in weights.text_where)} ({widths} wide) "
            f"and a UNet of {unet['block_out_channels'][0]} channels with {unet['cross_attention_dim']}-wide "
            f"cross-attention" + (f" and {adm}-wide pooled input" if adm else ""))


# ---------------------------------------------------------------------------------------------
# building the models: on the meta device, then the weights assigned in place


@contextmanager
def _parameters_on_meta():
    """Create modules whose parameters live on the meta device (no memory, no init cost); buffers
    (CLIP's position ids) are made as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and module._parameters[name].device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _modules(choice: Choice) -> dict:
    """The empty diffusers / transformers models of ``choice``'s configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with _parameters_on_meta():
        out = {"unet": UNet2DConditionModel.from_config(choice.configs["unet"]),
               "vae": AutoencoderKL.from_config(choice.configs["vae"])}
        for i, t in enumerate(TEXT_NAMES[:len(choice.tokenizers)]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            out[t] = cls(CLIPTextConfig(**{k: v for k, v in choice.configs[t].items() if not k.startswith("_")}))
    return out


def _diffusers_state(weights: Weights, choice: Choice) -> dict:
    """Each component's state in the diffusers / transformers names of its model."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    out = {"unet": convert_ldm_unet_checkpoint({UNET + k: v for k, v in weights.unet.items()}, choice.configs["unet"]),
           "vae": convert_ldm_vae_checkpoint({VAE + k: v for k, v in weights.vae.items()}, choice.configs["vae"])}
    for i, state in enumerate(weights.texts):
        keep = choice.configs[TEXT_NAMES[i]]["num_hidden_layers"]
        out[TEXT_NAMES[i]] = {k: v for k, v in state.items() if not k.endswith("position_ids")
                              and not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= keep)
                              and not (i == 0 and k == "text_projection.weight")}
    return out


def _named_for(model, state: dict) -> dict:
    """transformers' CLIP text models name their tower ``text_model.`` unless flattened."""
    if not hasattr(model, "text_model"):
        return state
    return {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}


def _fit(model, state: dict, what: str, name: str) -> None:
    """Raise naming the first key or shape of ``state`` that does not fit ``model``."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = [k for k in want.keys() & got.keys() if want[k] != got[k]]
    if missing or extra or wrong:
        detail = (f"{len(missing)} weights missing (first: {missing[0]})" if missing else
                  f"{len(extra)} weights it does not have (first: {extra[0]})" if extra else
                  f"{wrong[0]} is {got[wrong[0]]}, expected {want[wrong[0]]}")
        raise ModelError(f"{name} fits no shipped config: its {what} does not fit the config: {detail}")


PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


def check_fit(weights: Weights, choice: Choice, name: str) -> dict:
    """The empty models of ``choice``, every shape of ``weights`` checked against them."""
    models = _modules(choice)
    for part, state in _diffusers_state(weights, choice).items():
        _fit(models[part], _named_for(models[part], state), PART_NAMES[part], name)
    return models


def build_parts(weights: Weights, choice: Choice, name: str) -> dict:
    """Tokenizers, text encoders, UNet, VAE and scheduler config from weights that fit ``choice``
    (the tensors are used as they are: no copy)."""
    from embedpin.models.tokenizers import clip_tokenizer

    models = check_fit(weights, choice, name)  # (meta models: building them again costs milliseconds)
    for part, state in _diffusers_state(weights, choice).items():
        models[part].load_state_dict(_named_for(models[part], state), strict=True, assign=True)
    parts = dict(unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
                 scheduler_config=dict(choice.configs["scheduler"]), config_note=choice.describe())
    toks = [clip_tokenizer(t / "tokenizer_config.json") if t.parent.parent == FAMILIES_DIR else _folder_tokenizer(t)
            for t in choice.tokenizers]
    parts["tokenizer"] = toks[0]
    if len(toks) == 2:
        parts.update(tokenizer_2=toks[1], text_encoder_2=models["text_encoder_2"],
                     zero_empty_negative=bool(choice.configs["model_index"].get("force_zeros_for_empty_prompt", True)))
    return parts


def _folder_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, model_config: str | None = None) -> dict:
    """The parts of a single-file checkpoint (see the module doc): its shapes are checked against
    the chosen config before its weights are read, as ``dtype``."""
    shapes = read_weights(path)
    choice = choose(shapes, path.name, model_config)
    check_fit(shapes, choice, path.name)
    return build_parts(read_weights(path, dtype), choice, path.name)


def components_from_weights(unet: dict, vae: dict, texts: list[dict], name: str, metadata: dict | None = None,
                            model_config: str | None = None) -> dict:
    """The parts of a model whose weights are already in memory (ComfyUI's loaded MODEL, VAE and
    CLIP): ``unet`` / ``vae`` in LDM names without prefixes, ``texts`` in transformers' CLIP names
    (``text_model.`` optional), in conditioning order. The tensors are used in place."""
    family = {1: None, 2: "SDXL"}.get(len(texts))
    if family is None and texts:
        width = _shape(_flat_clip(texts[0]), "embeddings.token_embedding.weight")
        family = "SD 2.x" if width and width[1] == 1024 else "SD 1.x"
    if family is None:
        raise ModelError(f"{name}: no text encoder")
    flat = [_flat_clip(t) for t in texts]
    where = {"SD 1.x": ("clip_l",), "SD 2.x": ("clip_h",), "SDXL": ("clip_l", "clip_g")}[family]
    weights = Weights(family, dict(unet), dict(vae), flat, dict(metadata or {}), set(), where)
    return build_parts(weights, choose(weights, name, model_config), name)
