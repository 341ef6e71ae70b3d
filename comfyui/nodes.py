"""embedpin's ComfyUI nodes.

- **Pin**: pins a prompt's conditioning to target IMAGE(s) (an optional MASK: 1 = pin, 0 =
  ignore) with the MODEL, CLIP and VAE the workflow loaded (used in place: the model is not held
  twice), as ``embedpin optimize`` does. Outputs the pinned CONDITIONING (positive and negative, in
  ComfyUI's format; SDXL's with its pooled output and size) and the run folder (the HTML report is
  its ``index.html``), and writes the textual inversion to ``models/embeddings/NAME.safetensors``
  (``embedding:NAME`` in a prompt). ComfyUI's progress bar follows the run; its interrupt button
  stops it resumable: queue the same inputs again and it continues where it stopped.
- **Load pinned**: a run folder (picked from ``output/embedpin`` or typed) -> its CONDITIONING and
  the prompt text to use with its embedding.

Errors are embedpin's one-line messages, shown as ComfyUI shows a node's error.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import comfy.model_management
import folder_paths

from embedpin.api import run_config
from embedpin.config import SCHEDULERS, SearchConfig
from embedpin.errors import ConfigError, EmbedpinError, InputError
from embedpin.exports import export_run, load_pinned, usage_prompt
from embedpin.runner import resume, run
from embedpin.store import PINNED, STATE, RunStore, write_text

from . import bridge

CATEGORY = "conditioning/embedpin"
LOADERS = ("CheckpointLoaderSimple", "CheckpointLoader")
NODE_INFO = "comfyui.json"  # beside a Pin node's run: the embedding it wrote


def runs_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "embedpin"


def _checkpoint(graph: dict | None, node_id) -> str | None:
    """The checkpoint file the Pin node's MODEL, CLIP and VAE come from, when all three come straight
    from one checkpoint loader node (then the run's config names it, and the CLI can resume it)."""
    node = (graph or {}).get(str(node_id), {})
    links = [node.get("inputs", {}).get(k) for k in ("model", "clip", "vae")]
    sources = {str(x[0]) if isinstance(x, list) else None for x in links}
    source = graph.get(sources.pop(), {}) if len(sources) == 1 and None not in sources else {}
    name = source.get("inputs", {}).get("ckpt_name")
    if source.get("class_type") in LOADERS and isinstance(name, str):
        return folder_paths.get_full_path("checkpoints", name)
    return None


def _embedding_path(name: str) -> Path:
    """Where NAME's embedding goes; a file there that embedpin did not write is never replaced."""
    from safetensors import safe_open

    path = Path(folder_paths.get_folder_paths("embeddings")[0]) / f"{name}.safetensors"
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                ours = "embedpin" in (f.metadata() or {})
        except Exception:
            ours = False
        if not ours:
            raise InputError(f"{path} exists and is not an embedpin embedding: give the Pin node another name")
    return path


class Pin:
    DESCRIPTION = ("Pins a prompt's conditioning to target images with the workflow's MODEL, CLIP and VAE (used in "
                   "place), as embedpin optimize does; outputs the pinned CONDITIONING and the run folder, and writes "
                   "the textual inversion to models/embeddings. Interrupted, it continues when queued again.")

    @classmethod
    def INPUT_TYPES(cls):
        auto = "0: the model family's default, as embedpin optimize"
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the diffusion model of a checkpoint loader"}),
                "clip": ("CLIP", {"tooltip": "the same checkpoint's text encoder(s)"}),
                "vae": ("VAE", {"tooltip": "the same checkpoint's VAE"}),
                "images": ("IMAGE", {"tooltip": "the target image(s) to pin the prompt to"}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "the prompt to pin (A1111 "
                                      "emphasis: (word:1.2), [word], BREAK)"}),
                "negative": ("STRING", {"multiline": True, "default": ""}),
                "embedding_name": ("STRING", {"default": "pinned", "tooltip": "models/embeddings/NAME.safetensors; "
                                              "write embedding:NAME in a prompt"}),
                "generations": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "0: 16 floor(ln N)"}),
                "population": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "candidates per generation; "
                                       "0: 4 + 3 ln N"}),
                "batch": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "images per candidate"}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": auto}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 50.0, "step": 0.1, "tooltip": auto}),
                "sampler": (["auto", *sorted(SCHEDULERS)], {"default": "auto", "tooltip": "embedpin's sampler "
                            "(auto: the family's)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "which part of the target to pin: 1 pinned, 0 ignored (one for all "
                                  "targets or one per target)"}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": "0: the target's "
                                  "aspect ratio at the model's native area"}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8}),
                "validation_seeds": ("INT", {"default": 16, "min": 0, "max": 1024, "tooltip": "plain renders on "
                                             "seeds the search never uses; the pinned result is the best on them"}),
                "inversion_steps": ("INT", {"default": SearchConfig.inversion_steps, "min": 0, "max": 100000,
                                            "tooltip": "textual-inversion steps on the targets before the search "
                                                       "(the model's own gradient); 0: gradient-free only"}),
            },
            "hidden": {"graph": "PROMPT", "node_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "negative", "run_folder")
    OUTPUT_TOOLTIPS = ("the pinned prompt's conditioning", "the negative prompt's, as the run rendered it",
                       "the run folder (its report: index.html)")
    FUNCTION = "pin"
    CATEGORY = CATEGORY

    def pin(self, model, clip, vae, images, prompt, negative, embedding_name, generations, population, batch, steps,
            cfg, sampler, seed, mask=None, width=0, height=0, validation_seeds=16,
            inversion_steps=SearchConfig.inversion_steps, graph=None, node_id=None):
        name = bridge.check_name(embedding_name)
        embedding = _embedding_path(name)
        masks = bridge.check_masks(images, mask)
        checkpoint = _checkpoint(graph, node_id)
        comp = bridge.components(model, clip, vae, Path(checkpoint).name if checkpoint else "ComfyUI MODEL")
        # embedpin optimize's settings (0 / auto: its defaults); the model: the loader's file, when traced
        settings = dict(prompt=prompt, negative=negative, model=checkpoint or "comfyui", generations=generations or None,
                        population=population or None, batch=batch, steps=steps or None, cfg=cfg or None,
                        scheduler=None if sampler == "auto" else sampler, seed=seed, width=width or None,
                        height=height or None, validation_seeds=validation_seeds, inversion_steps=inversion_steps)
        out = runs_root() / f"{name}-{bridge.fingerprint(settings, images, masks, comp)}"
        new = not out.exists()
        try:
            targets, mask_files = bridge.save_images(images, masks, out / "inputs")
            config = run_config(target=targets, mask=mask_files or None, out=str(out), **settings)
            folder = self._run(config, comp, out, node_id)
        except EmbedpinError:
            if new and not list(out.glob("[0-9]*-*")):  # refused before a run began: leave nothing behind
                shutil.rmtree(out, ignore_errors=True)
            raise
        tensors, recipe = load_pinned(folder)
        written = self._embedding(folder, name, embedding)
        write_text(out / NODE_INFO, json.dumps({"embedding": written}))
        positive, negative = bridge.conditioning(tensors, recipe)
        return positive, negative, str(folder)

    @staticmethod
    def _run(config, comp, out: Path, node_id) -> Path:
        """This input's run: continued if a queue before stopped it, run if there is none."""
        done = sorted(p for p in out.glob("[0-9][0-9][0-9][0-9]-*") if (p / STATE).is_file())
        if done and RunStore.open(done[-1]).read_state().status == "finished":
            return done[-1]
        hooks = bridge.Hooks(comp.unet, config.optim.generations or 1, node_id)
        try:
            result = (resume(done[-1], components=comp, hooks=hooks) if done else
                      run(config, components=comp, hooks=hooks))
        finally:
            hooks.close()
        if result.interrupted:
            comfy.model_management.throw_exception_if_processing_interrupted()
        return result.run_dir

    @staticmethod
    def _embedding(folder: Path, name: str, path: Path) -> str | None:
        """Write the run's textual inversion as NAME; None when it has none (the plain prompt won)."""
        try:
            export_run(folder, "textual-inversion", path, token=name)
        except ConfigError as e:
            logging.warning(f"embedpin: no embedding written for {folder.name}: {e}")
            return None
        return name


def run_choices() -> list[str]:
    root = runs_root()
    found = sorted(p.parent.relative_to(root).as_posix() for p in root.glob(f"*/*/{PINNED}"))
    return found or ["(no runs yet)"]


class LoadPinned:
    DESCRIPTION = "A pinned run's conditioning (positive, negative) and the prompt to use with its embedding."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"run": (run_choices(), {"tooltip": "a Pin node's run under output/embedpin"})},
                "optional": {"run_folder": ("STRING", {"default": "", "tooltip": "or any run folder (embedpin "
                                                       "optimize's too); takes precedence"})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "negative", "prompt")
    OUTPUT_TOOLTIPS = ("the pinned conditioning", "its negative",
                       "the prompt with embedding:NAME, for CLIPTextEncode (the embedding's vectors only: the "
                       "conditioning output is the whole pinned result)")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @staticmethod
    def _folder(run: str, run_folder: str = "") -> Path:
        if run_folder.strip():
            return Path(run_folder.strip()).expanduser()
        if run not in run_choices() or run == "(no runs yet)":
            raise InputError(f"{run}: no such run under {runs_root()}")
        return runs_root() / run

    def load(self, run, run_folder=""):
        folder = self._folder(run, run_folder)
        tensors, recipe = load_pinned(folder)
        info = folder.parent / NODE_INFO
        embedding = json.loads(info.read_text()).get("embedding") if info.is_file() else None
        text = usage_prompt(recipe, f"embedding:{embedding}") if embedding else recipe["prompt"]
        return (*bridge.conditioning(tensors, recipe), text)

    @classmethod
    def IS_CHANGED(cls, run, run_folder=""):
        pinned = cls._folder(run, run_folder) / PINNED
        return pinned.stat().st_mtime if pinned.is_file() else ""


NODE_CLASS_MAPPINGS = {"EmbedpinPin": Pin, "EmbedpinLoadPinned": LoadPinned}
NODE_DISPLAY_NAME_MAPPINGS = {"EmbedpinPin": "Pin (embedpin)", "EmbedpinLoadPinned": "Load pinned (embedpin)"}
