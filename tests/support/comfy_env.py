"""ComfyUI's own code for the integration tests: the source snapshot found through
``EMBEDPIN_COMFYUI``, else ``../shared/vendor/ComfyUI`` beside the repository, else
``/work/shared/vendor/ComfyUI`` (a test is skipped, saying so, when none is there). It is GPL test
data: nothing is copied from it and the package never imports it. It is imported read-only, with
its model, input, output and user folders pointed at temporary ones, on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_PACK = ROOT / "comfyui"


def comfyui_dir() -> Path:
    """The ComfyUI source folder, or the test is skipped naming where it was looked for."""
    places = [os.environ.get("EMBEDPIN_COMFYUI"), ROOT.parent / "shared" / "vendor" / "ComfyUI",
              Path("/work/shared/vendor/ComfyUI")]
    for place in places:
        if place and (Path(place) / "comfy" / "sd.py").is_file():
            return Path(place)
    pytest.skip("ComfyUI's source is not here (set EMBEDPIN_COMFYUI to a ComfyUI checkout; looked in "
                + ", ".join(str(p) for p in places if p) + ")")


def import_comfyui(folders: Path):
    """Import ComfyUI (CPU only) with its model / input / output / user folders under ``folders``;
    returns its ``nodes`` module. ComfyUI's SD code paths do not use torchvision, which some of its
    other model files import at module level: an empty ``torchvision`` package stands in for it,
    put on the path only after transformers' CLIP classes are imported (transformers would take the
    stand-in for the real thing)."""
    source = comfyui_dir()
    for name in ("einops", "torchsde", "yaml", "scipy", "psutil", "aiohttp", "av", "pydantic", "sqlalchemy"):
        pytest.importorskip(name, reason=f"ComfyUI needs {name} (pip install -e '.[test]')")
    import transformers  # noqa: F401  (before the torchvision stand-in)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    stub = folders / "stubs"
    (stub / "torchvision").mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "transforms.py"):
        (stub / "torchvision" / name).touch()
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
        sys.path.append(str(stub))
    argv, sys.argv = sys.argv, ["main.py", "--cpu", "--disable-all-custom-nodes"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import folder_paths
        import nodes
    finally:
        sys.argv = argv
    folder_paths.models_dir = str(folders / "models")
    for kind in ("checkpoints", "embeddings", "vae", "loras"):
        path = folders / "models" / kind
        path.mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[kind] = ([str(path)], folder_paths.supported_pt_extensions)
    for kind in ("input", "output", "temp", "user"):
        (folders / kind).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(folders / "output"))
    folder_paths.set_input_directory(str(folders / "input"))
    folder_paths.set_temp_directory(str(folders / "temp"))
    folder_paths.set_user_directory(str(folders / "user"))
    return nodes


def pack(module: str):
    """A module of the node pack as ComfyUI loaded it (``nodes.load_custom_node`` names the package
    after its folder's path)."""
    return sys.modules[f"{str(NODE_PACK).replace('.', '_x_')}.{module}"]
