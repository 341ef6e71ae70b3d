"""Single-file checkpoints with the real widths of SD 1.x, SD 2.x and SDXL (320 model channels,
768 / 1024 / 768 + 1280 wide text encoders with CLIP's 49,408-token vocabulary, the SD VAE) and
random weights, cut in depth where the published families allow it: the UNet keeps its first
``levels`` levels with one resnet and one transformer block each, the text encoders keep ``text_layers``
layers (SD 1.x: all 12 by default, as ComfyUI's SD 1.x text encoder always has 12). What model
loaders tell families by (shapes and key names) is the real thing; what makes a model big (depth)
is not. Written in float16, as checkpoints are shared.

``header_only`` writes a file with a real header and no data on disk (a sparse file): the
published full-size layouts, for the checks that read shapes only."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import torch

from embedpin.models.checkpoint import SHIPPED, TEXT_NAMES

LEVELS = 2  # UNet levels kept: 320 and 640 channels


def cut_configs(shipped: str, levels: int | None = LEVELS, text_layers: tuple[int, ...] | None = (2, 2)) -> dict:
    """A shipped config's UNet / VAE / text-encoder configs with the UNet cut to ``levels`` levels of
    one resnet and one transformer block (None: as published) and ``text_layers`` layers per text
    encoder (None: as published; SD 2.x gets one more in the file, the unused last one)."""
    folder = SHIPPED[shipped].folder
    read = {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", *TEXT_NAMES)
            if (folder / c).is_dir()}
    unet = read["unet"]
    if levels is not None:
        depth = unet.get("transformer_layers_per_block")
        unet.update(block_out_channels=unet["block_out_channels"][:levels], layers_per_block=1,
                    down_block_types=unet["down_block_types"][:levels], up_block_types=unet["up_block_types"][-levels:])
        if isinstance(unet["attention_head_dim"], list):
            unet["attention_head_dim"] = unet["attention_head_dim"][:levels]
        if depth is not None:
            unet["transformer_layers_per_block"] = [1] * levels
    for name, layers in zip(TEXT_NAMES, text_layers or ()):
        if name in read:
            read[name]["num_hidden_layers"] = layers
    return read


def build(shipped: str, seed: int = 0, dtype: torch.dtype = torch.float32, **cut) -> SimpleNamespace:
    """Random-weight models of ``cut_configs(shipped, **cut)`` (in ``dtype``, CPU, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = cut_configs(shipped, **cut)
    state, default = torch.random.get_rng_state(), torch.get_default_dtype()
    torch.manual_seed(seed)  # weight init of a test fixture
    torch.set_default_dtype(dtype)  # (made in float16 directly: half the time of making and converting)
    try:
        parts = SimpleNamespace(unet=UNet2DConditionModel.from_config(configs["unet"]).eval(),
                                vae=AutoencoderKL.from_config(configs["vae"]).eval(), text_encoder_2=None)
        for i, name in enumerate(n for n in TEXT_NAMES if n in configs):
            cls = CLIPTextModelWithProjection if i else CLIPTextModel
            clean = {k: v for k, v in configs[name].items() if not k.startswith("_")}
            setattr(parts, name, cls(CLIPTextConfig(**clean)).eval())
    finally:
        torch.random.set_rng_state(state)
        torch.set_default_dtype(default)
    return parts


def write(shipped: str, path: str | Path, seed: int = 0, metadata: dict | None = None, **cut) -> Path:
    """The random-weight models of ``build`` as one original-layout float16 checkpoint."""
    from support.ldm_checkpoint import save_single_file

    return save_single_file(build(shipped, seed, torch.float16, **cut), path, metadata=metadata)


def header_only(path: str | Path, shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> Path:
    """A valid float16 safetensors file of these shapes whose data is a hole (a sparse file: no disk
    used, zeros if read)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return Path(path)


def published_layout(shipped: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the published full-size model of a shipped config, in the original layout,
    from models built on the meta device (nothing allocated)."""
    from support.ldm_checkpoint import ldm_state

    with torch.device("meta"):
        parts = build(shipped, levels=None, text_layers=None)
    return {k: tuple(v.shape) for k, v in ldm_state(parts).items()}


SPECS = {  # the session's checkpoints (conftest ``sd_checkpoints``)
    "sd15": dict(shipped="sd15", levels=1, text_layers=(12,)),   # ComfyUI's SD 1.x text encoder has 12 layers
    "sd21": dict(shipped="sd21", levels=1, text_layers=(2,)),
    "sdxl": dict(shipped="sdxl-base", levels=1, text_layers=(1, 1)),
}


def cache_key() -> str:
    """What the files depend on: this code, the shipped configs, the libraries that initialise them."""
    import hashlib

    import diffusers
    import transformers

    from embedpin.models.checkpoint import FAMILIES_DIR

    h = hashlib.sha256()
    here = Path(__file__).parent
    for p in [here / "sd_checkpoints.py", here / "ldm_checkpoint.py", *sorted(FAMILIES_DIR.rglob("*.json"))]:
        h.update(p.read_bytes())
    h.update(f"{torch.__version__} {diffusers.__version__} {transformers.__version__}".encode())
    return h.hexdigest()[:16]


def shapes_of(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    """A checkpoint's {key: shape} and metadata, from its header."""
    from embedpin.models.checkpoint import read_header

    return read_header(Path(path))
