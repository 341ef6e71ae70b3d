"""What the Pin node's model costs in memory inside ComfyUI: the model ComfyUI loaded, used in
place (the node's way), against embedpin loading the same checkpoint file itself (the model held
twice).

A checkpoint of SD 1.5's published architecture with random weights is written (float16, as
checkpoints are shared; ``--cut`` writes the test suite's cut-depth one instead), or ``--checkpoint``
is used. In one process, on the CPU: ComfyUI imports and loads it with its own checkpoint loader;
the Pin node's components are made from ComfyUI's objects; then, those dropped, embedpin loads the
file itself. The resident set (RSS) is read after each step, and the parameter bytes each way
holds are counted, with how many of the node's are ComfyUI's own tensors.

    python benchmarks/comfyui_memory.py [--checkpoint FILE | --cut] [--comfyui DIR]

Needs ComfyUI's source (``--comfyui``, $EMBEDPIN_COMFYUI or ../shared/vendor/ComfyUI) and its
packages (the test extra has them).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the checkpoint writer and ComfyUI's import live with the tests


def rss() -> float:
    """Resident set in GB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def param_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def shared_bytes(comp, theirs: list[torch.Tensor]) -> int:
    """Bytes of the components' parameters whose storage is one of ComfyUI's tensors."""
    pointers = {t.untyped_storage().data_ptr() for t in theirs}
    return sum(p.numel() * p.element_size() for m in (comp.unet, comp.vae, *comp.text_encoders)
               for p in m.parameters() if p.untyped_storage().data_ptr() in pointers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="an SD 1.x / 2.x / SDXL .safetensors (default: written)")
    p.add_argument("--cut", action="store_true", help="write the test suite's cut-depth SD 1.x checkpoint instead")
    p.add_argument("--comfyui", default=None, help="ComfyUI's source folder")
    a = p.parse_args()
    if a.comfyui:
        os.environ["EMBEDPIN_COMFYUI"] = a.comfyui
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = Path(tempfile.mkdtemp(prefix="embedpin-memory-"))
    try:
        measure(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(a, work: Path) -> None:
    from support.comfy_env import NODE_PACK, import_comfyui
    from support.sd_checkpoints import SPECS, write

    ckpt = Path(a.checkpoint) if a.checkpoint else work / "sd15.safetensors"
    if not a.checkpoint:
        cut = SPECS["sd15"] if a.cut else dict(levels=None, text_layers=None)
        write("sd15", ckpt, levels=cut["levels"], text_layers=cut["text_layers"])
        gc.collect()
    print(f"checkpoint: {ckpt} ({ckpt.stat().st_size / 1e9:.2f} GB on disk)")

    nodes = import_comfyui(work / "comfyui")
    asyncio.run(nodes.load_custom_node(str(NODE_PACK)))
    bridge = sys.modules[f"{str(NODE_PACK).replace('.', '_x_')}.bridge"]
    (work / "comfyui" / "models" / "checkpoints" / ckpt.name).symlink_to(ckpt.resolve())
    from embedpin.models.loader import load_components

    gc.collect()
    base = rss()
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)
        gc.collect()
        comfy = rss()
        theirs = [*model.model.diffusion_model.state_dict().values(), *vae.first_stage_model.state_dict().values(),
                  *clip.cond_stage_model.state_dict().values()]
        comfy_bytes = sum(t.numel() * t.element_size() for t in theirs)
        comp = bridge.components(model, clip, vae, ckpt.name)
        gc.collect()
        pin = rss()
        modules = (comp.unet, comp.vae, *comp.text_encoders)
        pin_bytes, pin_shared = param_bytes(modules), shared_bytes(comp, theirs)
        del comp, modules
        gc.collect()
        before_own = rss()
        own = load_components(str(ckpt))
        gc.collect()
        own_rss = rss()
        own_bytes = param_bytes((own.unet, own.vae, *own.text_encoders))
    print(f"ComfyUI's loaded model: {comfy - base:+.2f} GB RSS ({comfy_bytes / 1e9:.2f} GB of tensors)")
    print(f"Pin node's components from it: {pin - comfy:+.2f} GB RSS ({pin_bytes / 1e9:.2f} GB of parameters, "
          f"{pin_shared / 1e9:.2f} GB of them ComfyUI's own tensors, {(pin_bytes - pin_shared) / 1e9:.2f} GB copied)")
    print(f"embedpin loading the file itself: {own_rss - before_own:+.2f} GB RSS ({own_bytes / 1e9:.2f} GB of "
          f"parameters): the model held twice")


if __name__ == "__main__":
    main()
