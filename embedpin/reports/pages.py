"""Page contexts: store records -> the plain dicts the templates render.

Paths in a context are relative to the page's folder; image entries carry the
full-size ``href`` and the ``thumb`` shown on the page (None when the image is missing).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path, PurePosixPath

import numpy as np

from embedpin.config import PLACEHOLDER, RunConfig
from embedpin.errors import InputError
from embedpin.reports.images import thumb_relpath, thumbnail
from embedpin.reports.lineage import group_colours, lineage_array, trunk_groups
from embedpin.reports.templating import num
from embedpin.store import (
    PAGE,
    PREVIEW,
    TARGETS,
    CandidateRecord,
    GenerationRecord,
    RunStore,
    generation_dirname,
    generation_path,
    in_generation,
    read_analysis,
    target_file,
)


def relpath(rel: str) -> str:
    """A store-relative file path, refused when it could leave its folder."""
    path = PurePosixPath(str(rel))
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in str(rel):
        raise InputError(f"malformed image path in run store: {rel!r}")
    return path.as_posix()


def image_entry(folder: Path, rel: str, prefix: str = "", full: str | None = None, **extra) -> dict:
    """Describe ``folder/rel`` for a page ``prefix`` above ``folder``: the thumbnail shown (a
    stored preview itself, else one made once from the image) and the link (``full``, the
    full-size PNG where one is kept, else the image)."""
    rel = relpath(rel)
    if rel.endswith(PREVIEW):
        thumb = prefix + rel if (folder / rel).is_file() else None
    else:
        shown = thumbnail(folder / rel, folder / thumb_relpath(rel))
        thumb = None if shown is None else prefix + shown.relative_to(folder).as_posix()
    return dict(href=prefix + relpath(full or rel), thumb=thumb, path=rel, **extra)


def vector(values) -> str:
    """A parameter vector as text: ``"0.12, -1.5, 3"``."""
    return ", ".join(num(float(v)) for v in np.ravel(np.asarray(values, dtype=np.float64)))


def params_rows(params: dict | None, tokens: list[str] | None = None) -> list[tuple[str, str]]:
    """``{name: [floats]}`` -> ``[(name, "v0, v1, …")]`` in the store's order; token weights
    with each token beside its weight (``"a 0.98 · star 1.2"``) when ``tokens`` names them."""
    try:
        return [(str(name), token_weights(values, tokens) if name == "token_weights" else vector(values))
                for name, values in (params or {}).items()]
    except (TypeError, ValueError):
        raise InputError("malformed parameters in run store: expected {name: [numbers]}") from None


def token_weights(values, tokens: list[str] | None) -> str:
    """Token weights as ``"token weight · …"`` (a bare vector when the tokens are unknown or do
    not match in number)."""
    weights = np.ravel(np.asarray(values, dtype=np.float64))
    if not tokens or len(tokens) != len(weights):
        return vector(weights)
    return " · ".join(f"{t} {num(float(w))}" for t, w in zip(tokens, weights))


def _loss_order(candidates: list[CandidateRecord]) -> list[CandidateRecord]:
    def key(c: CandidateRecord) -> tuple:
        finite = isinstance(c.loss, (int, float)) and math.isfinite(c.loss)
        return (not finite, c.loss if finite else 0.0, c.index or 0)
    return sorted(candidates, key=key)


def candidate_context(folder: Path, c: CandidateRecord, best: int | None, tokens: list[str] | None = None) -> dict:
    """One candidate card: its scores, parameters and image grid with lineage colours."""
    images = list(c.images or [])
    lineage = lineage_array(c.lineage, len(images))
    colours = group_colours(trunk_groups(lineage))
    losses, seeds, full = list(c.image_losses or []), list(c.seeds or []), list(c.full or [])
    entries = [
        image_entry(folder, rel, full=full[j] if j < len(full) else None,
                    loss=losses[j] if j < len(losses) else None,
                    seed=seeds[j] if j < len(seeds) else None,
                    lineage=lineage[j].tolist(), colours=colours[j])
        for j, rel in enumerate(images)
    ]
    return dict(index=c.index, loss=c.loss, flip=c.flip, clip=c.clip, distance=c.distance,
                params=params_rows(c.params, tokens), images=entries, is_best=c.index == best)


def generation_context(run: RunStore, generation: int, record: GenerationRecord) -> dict:
    """Everything the generation page shows, paths relative to ``generations/NNNN/``."""
    folder = run.generation_dir(generation)
    best = record.best_candidate
    candidates = [candidate_context(folder, c, best, run.state.tokens) for c in _loss_order(record.candidates)]
    for c in candidates:
        for image in c["images"]:
            image["path"] = in_generation(generation, image["path"])
    errmaps = [image_entry(folder, rel, caption=f"image {j}")
               for j, rel in enumerate(record.errmaps or []) if (folder / relpath(rel)).exists()]
    on_disk = set(run.generations)

    def page(g: int) -> str | None:
        return f"../{generation_dirname(g)}/{PAGE}" if g in on_disk else None

    return dict(
        run=_run_summary(run), run_arg=run_argument(run), generation=generation, sigma=record.sigma,
        best_candidate=best,
        candidates=candidates, errmaps=errmaps, depth=max((len(i["colours"]) for c in candidates
                                                           for i in c["images"]), default=0),
        prev_page=page(generation - 1), next_page=page(generation + 1),
        live=run.live and generation == max(on_disk, default=generation),
    )


def _run_summary(run: RunStore) -> dict:
    return dict(id=run.id, status=run.status, count=run.count)


def recipe(config: RunConfig | None) -> dict:
    """The headline recipe fields (None each without a config)."""
    if config is None:
        return dict.fromkeys(("prompt", "negative", "model", "blocks", "seed"))
    return dict(prompt=config.prompt.prompt, negative=config.prompt.negative, model=config.model.name,
                blocks=", ".join(config.search.blocks), seed=config.optim.seed)


def config_rows(config: RunConfig | None) -> list[tuple[str, str]]:
    """Every setting as ``[("section.key", "value")]`` rows."""
    if config is None:
        return []
    tree = config.to_dict()
    return [(f"{section}.{key}" if isinstance(table, dict) else section, str(value))
            for section, table in tree.items()
            for key, value in (table.items() if isinstance(table, dict) else [(None, table)])
            if value is not None and value != []]


def folder_argument(root: Path) -> str:
    """A run folder as a user types it in a command (quoted for the shell): ``runs/<id>`` for
    a run under a ``runs`` folder (the default), else its path."""
    root = Path(root)
    return shlex.quote(f"runs/{root.name}" if root.parent.name == "runs" else str(root))


def run_argument(run: RunStore) -> str:
    """The run folder as a user types it in a command (:func:`folder_argument`)."""
    return folder_argument(run.root)


def usage_commands(where: str) -> list[str]:
    """The commands that export, re-render and analyze the pinned result of the run at ``where``."""
    return [
        f"embedpin export {where} --format textual-inversion -o pinned.safetensors",
        f"embedpin export {where} --format diffusers -o pinned_embeds.safetensors",
        f"embedpin render {where} --seed 7 -n 8 -o out/",
        f"embedpin analyze {where}",
    ]


def commands(run: RunStore) -> list[str]:
    """The commands a user copies to export and re-render the pinned conditioning."""
    return usage_commands(run_argument(run))[:3]


def targets_context(run: RunStore) -> tuple[list[dict], dict | None]:
    """Target and guide thumbnails (thumbnails live under ``report/thumbs/targets/``); a target
    with a mask carries it as ``mask``."""
    folder = run.root / TARGETS
    shown = (".png", ".jpg", ".jpeg", ".webp")
    files = sorted(p for p in folder.glob("target_*") if p.suffix.lower() in shown)
    targets = [dict(_target(run, p), name=p.stem, mask=_mask(run, p)) for p in files]
    guides = sorted(p for p in folder.glob("guide*") if p.suffix.lower() in shown)
    return targets, [dict(_target(run, p), name=p.stem) for p in guides]


def _mask(run: RunStore, target: Path) -> dict | None:
    """The thumbnail entry of a target's mask (``store.target_file(i, "mask")``), None without one."""
    index = target.stem.rpartition("_")[2]
    path = run.root / target_file(int(index), "mask") if index.isdigit() else None
    return dict(_target(run, path), name=path.stem) if path is not None and path.is_file() else None


def _target(run: RunStore, path: Path) -> dict:
    rel = f"{TARGETS}/{path.name}"
    shown = thumbnail(path, run.root / thumb_relpath(rel))
    return dict(href=rel, thumb=None if shown is None else shown.relative_to(run.root).as_posix())


def best_context(run: RunStore) -> dict | None:
    """The best candidate so far: where it is, its loss, parameters and images."""
    best = run.best
    if best is None:
        return None
    if best.kind == "plain" or best.generation is None:  # nothing has beaten the plain prompt on validation yet
        return dict(generation=None, candidate="plain", loss=best.loss, params=[], images=[], page=None,
                    validated=True)
    g = int(best.generation)
    prefix = f"{generation_path(g)}/"
    images = []
    if best.images:  # a validated result: its plain renders on the validation seeds
        images = _image_entries(run.root, "", best.images, best.image_losses)
    elif g in run.generations and (found := run.generation(g).candidate(best.candidate)) is not None:
        images = _image_entries(run.generation_dir(g), prefix, found.images, found.image_losses)
    return dict(generation=g, candidate=best.candidate, loss=best.loss, params=params_rows(best.params, run.state.tokens),
                images=images, page=prefix + PAGE, validated=bool(best.validation))


def _image_entries(folder: Path, prefix: str, images: list[str] | None, losses: list | None) -> list[dict]:
    losses = list(losses or [])
    return [image_entry(folder, rel, prefix, loss=losses[j] if j < len(losses) else None)
            for j, rel in enumerate(images or [])]


def file_context(run: RunStore) -> dict | None:
    """The run's textual-inversion file: its validation loss and images, the prompt it is used
    with (None: none has beaten the plain prompt, or the run has no token vectors)."""
    file = run.state.file
    if file is None:
        return None
    config = run.config()
    prompt = config.prompt.prompt if config else ""
    before = config is not None and config.search.placement == "before"
    usage = " ".join(p for p in ([PLACEHOLDER, prompt] if before else [prompt, PLACEHOLDER]) if p)
    return dict(loss=file.loss, generation=file.generation, kind=file.kind, usage=usage,
                page=in_generation(file.generation, PAGE),
                images=_image_entries(run.root, "", file.images, file.image_losses))


def plain_validation_context(run: RunStore) -> dict | None:
    """The plain prompt on the validation seeds: its loss and images (None without validation)."""
    plain = run.state.plain_validation
    if plain is None:
        return None
    return dict(loss=plain.loss, flip=plain.flip, images=_image_entries(run.root, "", plain.images, plain.image_losses))


def generation_rows(run: RunStore) -> list[dict]:
    """One table row per generation (history and/or on disk), with its page link and, for runs on
    Ray workers, the worker time split as text (``worker_split``: "w0 3.1 · w1 2.9"; sorted by the
    slowest worker, ``worker_max``)."""
    rows = {int(h.generation): h.to_json() for h in run.history}
    for g in run.generations:
        rows.setdefault(g, dict(generation=g))
    on_disk = set(run.generations)
    return [dict(row, page=in_generation(g, PAGE) if g in on_disk else None,
                 worker_split=worker_split(row.get("workers")),
                 worker_max=max(row["workers"].values()) if worker_split(row.get("workers")) else None)
            for g, row in sorted(rows.items())]


def worker_split(seconds: dict | None) -> str | None:
    """``{"w0": 3.12, "w1": 2.9}`` -> ``"w0 3.12 · w1 2.9"`` (None: not run on workers)."""
    if not isinstance(seconds, dict) or not seconds:
        return None
    return " · ".join(f"{name} {num(float(s), 3)}" for name, s in seconds.items())


def analysis_context(run: RunStore) -> dict | None:
    """``embedpin analyze``'s table for the run page (None: not measured), with whether it is
    older than the run's last generation."""
    a = read_analysis(run.root)
    if a is None:
        return None
    scale = max(abs(a.loss), 1e-12) / 100
    rows = [dict(r.to_json(), pct={k: getattr(r, k) / scale for k in ("remove", "zero", "double")}) for r in a.rows]
    return dict(generation=a.generation, loss=a.loss, plain=a.plain, seeds=a.seeds, tight=100 * a.tight,
                irrelevant=100 * a.irrelevant, rows=rows, stale=a.generation != run.count)


def run_context(run: RunStore, plots: list[dict], gif: str | None) -> dict:
    """Everything the run page shows, paths relative to ``runs/<id>/``."""
    targets, guide = targets_context(run)
    token_plot = next((p for p in plots if p.get("name") == "tokens.png"), None)
    return dict(
        analysis=analysis_context(run), token_plot=token_plot, run_arg=run_argument(run),
        plots=[p for p in plots if p is not token_plot], analyze=f"embedpin analyze {run_argument(run)}",
        run=_run_summary(run), live=run.live, recipe=recipe(run.config()), config_rows=config_rows(run.config()),
        targets=targets, guides=guide, best=best_context(run), plain=plain_validation_context(run),
        file=file_context(run), carries=any(b.get("name") == "token_vectors" for b in (run.state.space or {}).get("blocks", [])),
        notes=list(run.state.notes or []), gif=gif,
        generations=(rows := generation_rows(run)), workers=any(r["worker_split"] for r in rows),
        commands=commands(run),
    )
