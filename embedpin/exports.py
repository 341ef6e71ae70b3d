"""Pinned results: the run's ``pinned.safetensors`` and exports other tools load.

- ``diffusers``: ``prompt_embeds`` and ``negative_prompt_embeds`` (SDXL: + ``pooled_prompt_embeds``
  and ``negative_pooled_prompt_embeds``), for ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``.
- ``textual-inversion``: ``emb_params`` [N, D] (the key AUTOMATIC1111, ComfyUI and
  diffusers' ``load_textual_inversion`` read), used as ``"<prompt> <token>"``; SDXL:
  ``clip_l`` [N, 768] and ``clip_g`` [N, 1280], the layout AUTOMATIC1111, ComfyUI and kohya
  use (diffusers loads each half with its own ``load_textual_inversion`` call).

The recipe (model, prompt, sampler, seed, loss, ...) travels as JSON in the safetensors
metadata. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from embedpin.config import PLACEHOLDER, RunConfig
from embedpin.errors import ConfigError, InputError
from embedpin.evaluation.batch import Pinned, RunInfo
from embedpin.evaluation.session import Session, pick_device
from embedpin.guidance.blocks import FILE_BLOCKS
from embedpin.guidance.encode import input_widths
from embedpin.models.embeddings import to_file_layout
from embedpin.models.loader import load_components
from embedpin.render.sampler import RenderPlan, render, render_one
from embedpin.store import (
    GENERATIONS,
    PINNED,
    VALIDATION,
    FileRecord,
    PinnedRecord,
    RunStore,
    load_run,
    save_png,
    write_bytes,
)

FORMAT = "embedpin-pinned"


def _recipe(config: RunConfig, best: PinnedRecord, cfg_value: float, family: str, widths: tuple[int, ...]) -> dict:
    c = config
    return {"format": FORMAT, "version": 2, "model": c.model.name, "family": family, "widths": list(widths),
            "prompt": c.prompt.prompt,
            "negative": c.prompt.negative, "scheduler": c.render.scheduler, "steps": c.render.steps,
            "height": c.render.height, "width": c.render.width, "cfg": cfg_value, "seed": c.optim.seed, "batch": c.render.batch,
            "hyperbatch": c.render.hyperbatch, "loss": best.loss, "generation": best.generation,
            "candidate": best.candidate, "params": best.params, "init_word": c.search.init_word,
            "placement": c.search.placement,
            "clip_skip": c.prompt.clip_skip, "loss_on": "validation seeds" if best.validation else "search seeds",
            "validation_seeds": c.optim.validation_seeds}


def save_pinned(path: Path, config: RunConfig, info: RunInfo, pinned: Pinned, best: PinnedRecord,
                file: tuple[Pinned, FileRecord] | None = None, plain_loss: float | None = None) -> None:
    """Write a candidate's conditioning (``Session.pinned``: what the evaluator built for it) as
    the run's pinned result (atomic), its recipe from the run's config, the model's description
    ``info`` (family, text widths) and ``best``; with ``file`` (the run's textual-inversion
    file: its conditioning and record), its vectors as ``file_vectors`` and its figures in the
    recipe's ``file``; ``plain_loss``: the plain prompt's validation loss."""
    recipe = {**_recipe(config, best, pinned.cfg, info.family, tuple(info.widths)), "plain_loss": plain_loss}
    tensors = dict(pinned.tensors)
    if file is not None:
        held, record = file
        tensors["file_vectors"] = held.tensors["token_vectors"]
        recipe["file"] = {"loss": record.loss, "flip": record.flip, "generation": record.generation,
                          "kind": record.kind, "cfg": held.cfg}
    write_bytes(path, _to_bytes(tensors, recipe))


def _to_bytes(tensors: dict, recipe: dict) -> bytes:
    return save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                metadata={"embedpin": json.dumps(recipe)})


def load_pinned(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, recipe) from a pinned.safetensors or a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / PINNED
    if not p.is_file():
        raise InputError(f"{path}: no pinned result here (a run folder with {PINNED}, or the file)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        recipe = json.loads(meta["embedpin"])
    except (KeyError, ValueError):
        raise InputError(f"{p}: not an embedpin pinned file (no recipe in its metadata)") from None
    if "prompt_embeds" not in tensors:
        raise InputError(f"{p}: no prompt_embeds in it")
    return tensors, recipe


def not_carried(recipe: dict) -> list[str]:
    """Searched blocks that a textual-inversion file cannot carry (they act on the encoder's
    output): all but :data:`~embedpin.guidance.blocks.FILE_BLOCKS`, token weights only where some weight is not 1."""
    def moved(name: str, values: list[float]) -> bool:
        return name != "token_weights" or any(abs(v - 1.0) > 1e-6 for v in values)

    return [n for n, v in recipe.get("params", {}).items() if n not in FILE_BLOCKS and moved(n, v)]


@dataclass
class Exported:
    """What ``export`` wrote: the file; for a textual-inversion file, the prompt to use it with,
    the CFG scale, what of the whole result it does not carry (blocks), and its validation loss
    beside the whole result's and the plain prompt's (None where the run did not measure it)."""

    path: Path
    usage: str | None = None
    cfg: float | None = None
    lost: list[str] = field(default_factory=list)
    file_loss: float | None = None
    result_loss: float | None = None
    plain_loss: float | None = None

    def describe(self) -> list[str]:
        """What a person reads after exporting."""
        lines = [f"wrote {self.path}"]
        if self.usage is not None:
            lines.append(f"use it with the prompt: {self.usage}   (CFG {self.cfg:g}; the file's name, or the token "
                         f"you load it under, stands for the token)")
        if self.file_loss is not None:
            lines.append(f"file_validation_loss {self.file_loss:.4f} on the run's validation seeds: the whole "
                         f"result {self.result_loss:.4f}, the plain prompt {self.plain_loss:.4f}")
        return lines


def export_run(run: str | Path, fmt: str, output: str | Path, token: str = PLACEHOLDER) -> Exported:
    """Export a run's pinned result as ``diffusers`` embeddings or a ``textual-inversion`` file.

    The textual-inversion file is the run's file (``file_vectors``: its best validated
    candidate held all in token vectors, measured as a user renders it); runs from before
    it existed export the pinned result's token vectors, listing in the metadata what else it
    searched (:func:`not_carried`). The diffusers export is the exact pinned conditioning."""
    tensors, recipe = load_pinned(run)
    out = Path(output)
    if not out.parent.exists():
        raise InputError(f"{out.parent}: no such folder for the output")
    if fmt == "diffusers":
        keep = {k: v for k, v in tensors.items() if k in ("prompt_embeds", "negative_prompt_embeds",
                                                           "pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
        write_bytes(out, save(keep, metadata={"embedpin": json.dumps(recipe)}))
        return Exported(out)
    if fmt != "textual-inversion":
        raise ConfigError(f"unknown export format {fmt!r}: diffusers or textual-inversion")
    vectors, cfg, lost, file = _file_vectors(tensors, recipe)
    usage = usage_prompt(recipe, token)
    done = Exported(out, usage, cfg, lost, file and file["loss"], recipe.get("loss"), recipe.get("plain_loss"))
    layout = to_file_layout(vectors, recipe.get("widths") or [], recipe.get("family", "SD 1.x"))
    meta = {**recipe, "token": token, "usage": usage, "cfg": cfg, "not_carried": lost,
            "file_validation_loss": done.file_loss}
    write_bytes(out, save({k: v.contiguous() for k, v in layout.items()}, metadata={"embedpin": json.dumps(meta)}))
    return done


def _file_vectors(tensors: dict, recipe: dict) -> tuple[torch.Tensor, float, list[str], dict | None]:
    """(vectors, CFG, blocks not carried, the file's figures) of a run's textual-inversion file."""
    if "file_vectors" in tensors:
        file = recipe["file"]
        return tensors["file_vectors"], float(file["cfg"]), [], file
    if recipe.get("version", 1) >= 2 and recipe.get("loss_on") == "validation seeds" \
            and "token_vectors" in recipe.get("params", {}):
        raise ConfigError("no textual-inversion form of this run's results beat the plain prompt on the validation "
                          "seeds: use the prompt as written, or --format diffusers for the whole pinned result")
    if recipe.get("candidate") == "plain":
        raise ConfigError("no candidate of this run beat the plain prompt on the validation seeds, so there "
                          "is no embedding to export: the prompt as written is the result")
    if "token_vectors" not in tensors:
        raise ConfigError("this run did not search token vectors, so it has no textual-inversion form; "
                          "use --format diffusers, or run with --blocks token_vectors")
    return tensors["token_vectors"], float(recipe["cfg"]), not_carried(recipe), None


def usage_prompt(recipe: dict, token: str) -> str:
    """The prompt a textual-inversion file is used with: the run's prompt with the token where the
    run put its placeholders (after the words, or before them)."""
    parts = [recipe["prompt"], token] if recipe.get("placement", "after") == "after" else [token, recipe["prompt"]]
    return " ".join(p for p in parts if p.strip())


def recipe_size(recipe: dict) -> tuple[int, int]:
    """(height, width) a pinned result was made at (older recipes: one square ``size``)."""
    return int(recipe.get("height") or recipe["size"]), int(recipe.get("width") or recipe["size"])


def check_family(recipe: dict, components) -> None:
    """A pinned result fits only a model of its own family and text widths (InputError)."""
    family, widths = recipe.get("family"), recipe.get("widths")
    if family is None:
        return
    ours = list(input_widths(components))
    if family != components.family or (widths and list(widths) != ours):
        raise InputError(f"this pinned result is {family} (text {' + '.join(map(str, widths or []))}); model "
                         f"{components.name} is {components.family} (text {' + '.join(map(str, ours))}): render it "
                         f"with a model of its family")


def render_pinned(source: str | Path, seed: int = 0, n: int = 8, out: str | Path = "out", steps: int | None = None,
                  device: str = "auto", model: str | None = None, model_config: str | None = None) -> list[Path]:
    """Render ``n`` images (seeds seed..seed+n-1, plain batch) of a pinned result, with the
    run's model or ``model`` (another checkpoint of the same family, e.g. a fine-tune)."""
    if n < 1:
        raise ConfigError(f"-n must be >= 1 (got {n})")
    tensors, recipe = load_pinned(source)
    comp = load_components(model or recipe["model"], device=pick_device(device), model_config=model_config)
    check_family(recipe, comp)
    height, width = recipe_size(recipe)
    plan = RenderPlan(batch=1, steps=steps or recipe["steps"], scheduler=recipe["scheduler"],
                      height=height, width=width, hyperbatch=False)
    cond = tensors["prompt_embeds"].to(comp.device)
    neg = tensors["negative_prompt_embeds"].to(comp.device)
    pooled = {k: tensors[f].to(comp.device) for k, f in (("pooled", "pooled_prompt_embeds"),
                                                         ("negative_pooled", "negative_pooled_prompt_embeds"))
              if f in tensors}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        plan.seed = seed + k
        img = render(comp, cond, neg, torch.tensor([recipe["cfg"]]), plan, **pooled).images[0, 0]
        path = folder / f"pinned_seed{seed + k}.png"
        save_png(path, img)
        paths.append(path)
    return paths


def _find_image(run: RunStore, rel: str):
    """(generation or None, the record holding image ``rel`` (run-relative), its index b)."""
    parts = PurePosixPath(rel).parts
    if len(parts) >= 2 and parts[0] == VALIDATION:
        plain = run.state.plain_validation
        if plain is not None and rel in plain.images:
            return None, None, plain.images.index(rel)
    if len(parts) >= 3 and parts[0] == GENERATIONS and parts[1].isdigit() and int(parts[1]) in run.generations:
        g = int(parts[1])
        record, inner = run.generation(g), PurePosixPath(*parts[2:]).as_posix()
        for c in record.candidates:
            for names in (c.images, c.full or []):
                if inner in names:
                    return g, c, names.index(inner)
        for v in record.validation or []:
            if rel in v.images:
                return g, v, v.images.index(rel)
    raise InputError(f"{rel}: not an image of this run's report (give its path inside the run folder, as the "
                     "report's tooltips show it: generations/NNNN/images/cII_iBB.webp)")


@torch.no_grad()
def render_image(run_dir: str | Path, image: str, out: str | Path, device: str = "auto") -> Path:
    """Re-render one image of a run's report at full size, exactly as the run rendered it: a
    candidate's image (its generation's search plan, seed and lineage row: the image replays
    alone, ``render.sampler.render_one``), or a validation render (image b of the plain batch
    on the validation seeds). Writes ``out/<image name>.png``."""
    run = load_run(run_dir)
    rel = Path(image)
    rel = (rel.resolve().relative_to(run.root.resolve()) if rel.is_absolute() else rel).as_posix()
    g, record, b = _find_image(run, rel)
    config = run.config()
    config.model.device = device
    session = Session.of_run(run, config)
    if record is None:
        cond, plan = session.plain_conditioning(), session.validation
    else:
        cond = session.conditioning(record.params)
        plan = session.search_plan(g) if record.kind is None else session.validation
    row = torch.as_tensor(record.lineage[b] if record is not None and record.kind is None else [b])
    img = render_one(session.components, cond.prompt_embeds, cond.negative_embeds, cond.cfg, plan, row,
                     init_image=session.ctx.init_image, strength=cond.strength, **cond.pooled())
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return save_png(folder / f"{Path(rel).stem}.png", img)
