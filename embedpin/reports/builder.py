"""Write a run's HTML report: ``update`` after each generation, ``rebuild`` from scratch.

``update(run_dir, g)`` writes generation g's page and assets, rewrites generation
g-1's page (its "next" link appears and it stops refreshing) and refreshes the run
page, so its cost does not grow with the number of old generation pages. Call it once
more after the run loop marks the state finished or interrupted, so the pages stop
refreshing. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedpin.errors import InputError
from embedpin.reports import plots
from embedpin.reports.images import animation, frame
from embedpin.reports.pages import generation_context, run_context
from embedpin.reports.templating import render
from embedpin.store import ASSETS, GENERATION, PAGE, RunStore, load_run, read_analysis, write_text

RUN_PLOTS = (  # (file, title, plotter, source, caption: how to read it)
    ("loss.png", "best / median / worst loss", plots.loss_plot, "history",
     "The generation's candidates on the search seeds: falling lines mean the search is finding better conditionings; "
     "a wide best-to-worst gap means it is still exploring."),
    ("validation.png", "search vs validation loss", plots.validation_plot, "validation",
     "The same candidates on seeds the search never used, as plain batches (what you will see): below the plain "
     "prompt's line means the pinned result holds on new seeds; far above the search loss means it fits the search "
     "seeds only."),
    ("sigma.png", "sigma and axis ratio", plots.sigma_plot, "history",
     "Step size and the covariance's axis ratio: a shrinking sigma means the search is converging; a growing axis "
     "ratio means some directions matter much more than others."),
    ("spectrum.png", "eigenvalue spectrum", plots.spectrum_plot, "history",
     "The covariance's eigenvalues per generation: spread-out lines mean the search has learnt which directions "
     "matter."),
    ("components.png", "ꟻLIP and CLIP components", plots.components_plot, "history",
     "Each loss term of the generation's best candidate (lower is closer to the target)."),
    ("pareto.png", "Pareto front", plots.pareto_plot, "pareto",
     "Loss against distance from the plain prompt (--max-distance): each point is a trade-off; the left end stays "
     "closest to your prompt."),
    ("params.png", "best candidate's parameters", plots.params_plot, "history",
     "The best candidate's parameters per generation, one colour per block: flat lines mean settled values."),
    ("tokens.png", "token analysis", plots.token_plot, "analysis",
     "Per prompt token (pinned weight and verdict under it): how much worse the pinned result gets on the validation "
     "seeds with the token's weight at 0, doubled, or the token removed. Bars above the dashed line: the result "
     "hinges on that token (tight); bars near 0: it does not (loose or irrelevant)."),
)


def update(run_dir: str | Path, generation: int | None = None) -> Path:
    """Report generation ``generation`` (default: the latest on disk) and refresh the run page."""
    run = load_run(run_dir)
    if generation is None:
        generation = max(run.generations, default=None)
    if generation is not None:
        if generation not in run.generations:
            raise InputError(f"generation {generation} of {run.root} has no {GENERATION}")
        write_generation(run, generation, assets=True)
        if generation - 1 in run.generations:
            write_generation(run, generation - 1, assets=False)
    return write_run(run)


def rebuild(run_dir: str | Path) -> Path:
    """Rewrite every page of the run (what ``embedpin report runs/<id>`` does); returns the run page."""
    run = load_run(run_dir)
    for g in run.generations:
        write_generation(run, g, assets=True)
    return write_run(run)


def write_generation(run: RunStore, generation: int, assets: bool = True) -> Path:
    """Write ``generations/NNNN/index.html``; its histogram and GIF frame too when ``assets``
    is set or they are missing (thumbnails are always made once per image)."""
    record = run.generation(generation)
    folder = run.generation_dir(generation)
    context = generation_context(run, generation, record)
    histogram = folder / ASSETS / "histogram.png"
    if assets or not histogram.exists():
        losses = np.array([_float(c.loss) for c in record.candidates])
        per_image = np.array([_float(v) for c in record.candidates for v in c.image_losses or []])
        if not plots.histogram_plot(losses, per_image, histogram):
            histogram.unlink(missing_ok=True)
    if assets or not (folder / ASSETS / "frame.png").exists():
        write_frame(run, generation, context)
    context["histogram"] = f"{ASSETS}/histogram.png" if histogram.exists() else None
    return write_text(folder / PAGE, render("generation.html", **context))


def write_frame(run: RunStore, generation: int, context: dict) -> bool:
    """The animation frame of a generation: its best candidate's thumbnails."""
    folder = run.generation_dir(generation)
    best = [c for c in context["candidates"] if c["is_best"]] or context["candidates"][:1]
    tiles = [folder / i["thumb"] for c in best for i in c["images"] if i["thumb"]]
    return frame(tiles, folder / ASSETS / "frame.png", f"gen {generation}")


def write_run(run: RunStore) -> Path:
    """Write the run page ``index.html`` with its plots and the best-over-generations GIF."""
    assets = run.root / ASSETS
    sources = {"history": run.history, "pareto": run.pareto, "analysis": read_analysis(run.root),
               "validation": {"history": run.history, "plain": run.state.plain_validation}}
    written = [dict(src=f"{ASSETS}/{name}", title=title, caption=caption, name=name)
               for name, title, plot, source, caption in RUN_PLOTS if plot(sources[source], assets / name)]
    frames = [run.generation_dir(g) / ASSETS / "frame.png" for g in run.generations]
    for g, path in zip(run.generations, frames):
        if not path.exists():
            write_frame(run, g, generation_context(run, g, run.generation(g)))
    gif = f"{ASSETS}/best.gif" if animation(frames, assets / "best.gif") else None
    return write_text(run.root / PAGE, render("run.html", **run_context(run, written, gif)))


def _float(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")
