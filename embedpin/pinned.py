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
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from embedpin.config import RunConfig
from embedpin.errors import ConfigError, InputError
from embedpin.guidance.encode import input_widths
from embedpin.models.embeddings import to_file_layout
from embedpin.models.loader import load_components
from embedpin.optimizer.batch import Pinned, RunInfo
from embedpin.optimizer.session import Session, pick_device
from embedpin.render.sampler import RenderPlan, render, render_one
from embedpin.store import PINNED, PinnedRecord, Run, load_run, save_png, write_bytes

FORMAT = "embedpin-pinned"


def _recipe(config: RunConfig, best: PinnedRecord, cfg_value: float, family: str, widths: tuple[int, ...]) -> dict:
    c = config
    return {"format": FORMAT, "version": 1, "model": c.model.name, "family": family, "widths": list(widths),
            "prompt": c.prompt.prompt,
            "negative": c.prompt.negative, "scheduler": c.render.scheduler, "steps": c.render.steps,
            "height": c.render.height, "width": c.render.width, "cfg": cfg_value, "seed": c.optim.seed, "batch": c.render.batch,
            "hyperbatch": c.render.hyperbatch, "loss": best.loss, "generation": best.generation,
            "candidate": best.candidate, "params": best.params, "init_word": c.search.init_word,
            "clip_skip": c.prompt.clip_skip, "loss_on": "validation seeds" if best.validation else "search seeds",
            "validation_seeds": c.optim.validation_seeds}


def save_pinned(path: Path, config: RunConfig, info: RunInfo, pinned: Pinned, best: PinnedRecord) -> None:
    """Write a candidate's conditioning (``Session.pinned``: what the evaluator built for it) as
    the run's pinned result (atomic), its recipe from the run's config, the model's description
    ``info`` (family, text widths) and ``best``."""
    recipe = _recipe(config, best, pinned.cfg, info.family, tuple(info.widths))
    write_bytes(path, _to_bytes(pinned.tensors, recipe))


def _to_bytes(tensors: dict, recipe: dict) -> bytes:
    return save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                metadata={"embedpin": json.dumps(recipe)})


def load_pinned(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, recipe) from a pinned.safetensors or a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / PINNED
    if not p.is_file():
        raise InputError(f"{path}: no pinned result here (a run folder with pinned.safetensors, or the file)")
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


CARRIED = ("token_vectors", "cfg", "strength")  # the file itself, and the recipe's sampling settings


def not_carried(recipe: dict) -> list[str]:
    """Searched blocks that a textual-inversion file cannot carry (they act on the encoder's
    output): all but :data:`CARRIED`, token weights only where some weight is not 1."""
    def moved(name: str, values: list[float]) -> bool:
        return name != "token_weights" or any(abs(v - 1.0) > 1e-6 for v in values)

    return [n for n, v in recipe.get("params", {}).items() if n not in CARRIED and moved(n, v)]


def export_run(run: str | Path, fmt: str, output: str | Path, token: str = "<pinned>") -> tuple[Path, list[str]]:
    """Export a run's pinned result as ``diffusers`` embeddings or a ``textual-inversion`` file
    (written whole or not at all); returns the file and what of the result it does not carry.

    The textual-inversion file holds the token vectors only; what else the run searched
    (:func:`not_carried`) is listed in its metadata, values included, and the diffusers
    export is the exact pinned conditioning."""
    tensors, recipe = load_pinned(run)
    out = Path(output)
    if not out.parent.exists():
        raise InputError(f"{out.parent}: no such folder for the output")
    if fmt == "diffusers":
        keep = {k: v for k, v in tensors.items() if k in ("prompt_embeds", "negative_prompt_embeds",
                                                           "pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
        write_bytes(out, save(keep, metadata={"embedpin": json.dumps(recipe)}))
        return out, []
    if fmt == "textual-inversion":
        if recipe.get("candidate") == "plain":
            raise ConfigError("no candidate of this run beat the plain prompt on the validation seeds, so there "
                              "is no embedding to export: the prompt as written is the result")
        if "token_vectors" not in tensors:
            raise ConfigError("this run did not search token vectors, so it has no textual-inversion form; "
                              "use --format diffusers, or run with --blocks token_vectors")
        usage = f"{recipe['prompt']} {token}".strip()
        lost = not_carried(recipe)
        layout = to_file_layout(tensors["token_vectors"], recipe.get("widths") or [], recipe.get("family", "SD 1.x"))
        write_bytes(out, save({k: v.contiguous() for k, v in layout.items()},
                              metadata={"embedpin": json.dumps({**recipe, "token": token, "usage": usage,
                                                                 "not_carried": lost})}))
        return out, lost
    raise ConfigError(f"unknown export format {fmt!r}: diffusers or textual-inversion")


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


def _find_image(run: Run, rel: str):
    """(generation or None, the record holding image ``rel`` (run-relative), its index b)."""
    parts = PurePosixPath(rel).parts
    if len(parts) >= 2 and parts[0] == "validation":
        plain = run.state.plain_validation
        if plain is not None and rel in plain.images:
            return None, None, plain.images.index(rel)
    if len(parts) >= 3 and parts[0] == "generations" and parts[1].isdigit() and int(parts[1]) in run.generations:
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
    config = run.config
    config.model.device = device
    session = Session.prepare(config)
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
