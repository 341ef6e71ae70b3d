"""Convergence plots (matplotlib, Agg backend, no pyplot state): one small PNG each.

Every function takes the store's records, writes one file atomically and returns
whether there was anything to plot (a run without CLIP has no CLIP curve, a run
without the size limiter has no Pareto front).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from embedpin.store import HistoryEntry, PlainValidation, save_figure

DPI = 96


def series(records: list, key: str) -> np.ndarray:
    """Field ``key`` of each record (a store record or a dict) as floats ``[N]``; missing,
    null and non-finite entries are NaN."""
    values = [r.get(key) if isinstance(r, dict) else getattr(r, key, None) for r in records]
    out = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def _axes(title: str, xlabel: str = "generation", ylabel: str = "", right: float = 0.96) -> tuple[Figure, object]:
    fig = Figure(figsize=(5.4, 3.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.13, 0.16, right - 0.13, 0.74))
    if xlabel == "generation":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _log_y(ax) -> None:
    """A log y axis whose tick labels stay short (``0.45``, not ``4.5 × 10⁻¹``: those overflow the
    plot's margin when the range is under a decade)."""
    ax.set_yscale("log")
    short = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(short)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(short if hi < 10 * lo else NullFormatter())  # minor labels within a decade only


def _save(fig: Figure, ax, dst: Path, legend: bool = True) -> bool:
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    save_figure(dst, fig, dpi=DPI)
    return True


def loss_plot(history: list[HistoryEntry], dst: Path) -> bool:
    """Best / median / worst candidate loss per generation, and the best so far."""
    if not history:
        return False
    g = series(history, "generation")
    fig, ax = _axes("loss per generation", ylabel="loss")
    worst, median, best = series(history, "worst"), series(history, "median"), series(history, "best")
    ax.fill_between(g, best, worst, color="tab:blue", alpha=0.12, linewidth=0)
    ax.plot(g, worst, color="tab:red", lw=1, label="worst")
    ax.plot(g, median, color="tab:orange", lw=1, label="median")
    ax.plot(g, best, color="tab:blue", lw=1.5, marker=".", label="best")
    ax.plot(g, np.fmin.accumulate(np.where(np.isnan(best), np.inf, best)), color="black", lw=1, ls="--",
            label="best so far")
    return _save(fig, ax, dst)


def validation_plot(run: dict, dst: Path) -> bool:
    """Search loss vs validation loss per generation, and the plain prompt's validation loss.

    ``run``: {"history": [...], "plain": the plain prompt's validation record or None}. The
    search loss is measured on the search's own seeds, the validation loss on seeds the
    search never uses, rendered as plain batches: what a user will see."""
    history: list[HistoryEntry] = run["history"]
    plain: PlainValidation | None = run.get("plain")
    validation = [r.validation or {} for r in history]
    if not any(validation):
        return False
    g = series(history, "generation")
    fig, ax = _axes("search vs validation loss", ylabel="loss")
    ax.plot(g, series(history, "best"), color="tab:blue", lw=1, marker=".", label="search: generation's best")
    for kind, colour in (("best", "tab:green"), ("mean", "tab:purple")):
        v = np.array([np.nan if x.get(kind) is None else x[kind] for x in validation], dtype=np.float64)
        if not np.isnan(v).all():
            ax.plot(g, v, color=colour, lw=1.5, marker="o", ms=3, label=f"validation: {kind}")
    if plain:
        ax.axhline(plain.loss, color="black", lw=1, ls="--", label="validation: plain prompt")
    return _save(fig, ax, dst)


def sigma_plot(history: list[HistoryEntry], dst: Path) -> bool:
    """CMA-ES step size sigma and the covariance axis ratio (log scales)."""
    sigma, ratio = series(history, "sigma"), series(history, "axis_ratio")
    if np.isnan(sigma).all() and np.isnan(ratio).all():
        return False
    g = series(history, "generation")
    fig, ax = _axes("step size and axis ratio", ylabel="sigma", right=0.86)
    ax.plot(g, sigma, color="tab:blue", lw=1.5, label="sigma")
    if (sigma[np.isfinite(sigma)] > 0).all():
        _log_y(ax)
    if not np.isnan(ratio).all():
        ax2 = ax.twinx()
        ax2.plot(g, ratio, color="tab:green", lw=1, ls="--", label="axis ratio")
        ax2.set_ylabel("axis ratio", fontsize=9)
        ax2.tick_params(labelsize=8)
        if (ratio[np.isfinite(ratio)] > 0).all():
            _log_y(ax2)
        fig.legend(fontsize=8, loc="upper right", bbox_to_anchor=(0.86, 0.9))
        return _save(fig, ax, dst, legend=False)
    return _save(fig, ax, dst)


def spectrum_plot(history: list[HistoryEntry], dst: Path) -> bool:
    """Eigenvalues of the covariance matrix per generation (sorted, log scale)."""
    rows = [np.sort(np.asarray(r.eigenvalues or [], dtype=np.float64))[::-1] for r in history]
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return False
    spectrum = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        spectrum[i, : len(r)] = r
    spectrum[~(spectrum > 0)] = np.nan
    fig, ax = _axes("covariance eigenvalue spectrum", ylabel="eigenvalue")
    ax.plot(series(history, "generation"), spectrum, color="tab:purple", lw=0.8, alpha=0.7)
    if np.isfinite(spectrum).any():
        _log_y(ax)
    return _save(fig, ax, dst, legend=False)


def components_plot(history: list[HistoryEntry], dst: Path) -> bool:
    """The best candidate's ꟻLIP and CLIP loss components per generation."""
    flip, clip = series(history, "flip"), series(history, "clip")
    if np.isnan(flip).all() and np.isnan(clip).all():
        return False
    g = series(history, "generation")
    fig, ax = _axes("ꟻLIP and CLIP components of the best", ylabel="loss component")
    if not np.isnan(flip).all():
        ax.plot(g, flip, color="tab:red", lw=1.5, marker=".", label="ꟻLIP")
    if not np.isnan(clip).all():
        ax.plot(g, clip, color="tab:cyan", lw=1.5, marker=".", label="CLIP")
    return _save(fig, ax, dst)


def pareto_plot(pareto: list[dict], dst: Path) -> bool:
    """The (loss, distance) Pareto front of the size limiter, coloured by generation."""
    if not pareto:
        return False
    loss, dist, gen = series(pareto, "loss"), series(pareto, "distance"), series(pareto, "generation")
    order = np.argsort(dist)
    fig, ax = _axes("Pareto front (size limiter)", xlabel="distance from the plain prompt", ylabel="loss")
    ax.plot(dist[order], loss[order], color="grey", lw=1, zorder=1)
    points = ax.scatter(dist, loss, c=gen, cmap="viridis", s=18, zorder=2)
    fig.colorbar(points, ax=ax, pad=0.01).set_label("generation", fontsize=8)
    return _save(fig, ax, dst, legend=False)


def params_plot(history: list[HistoryEntry], dst: Path) -> bool:
    """The best candidate's parameters per generation, one colour per block."""
    names = sorted({n for r in history for n in (r.best_params or {})})
    if not names:
        return False
    g = series(history, "generation")
    fig, ax = _axes("best candidate's parameters", ylabel="value")
    for k, name in enumerate(names):
        rows = [np.ravel(np.asarray((r.best_params or {}).get(name, []), dtype=np.float64)) for r in history]
        width = max(len(r) for r in rows)
        values = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            values[i, : len(r)] = r
        lines = ax.plot(g, values, color=f"C{k % 10}", lw=1, alpha=0.8)
        lines[0].set_label(f"{name} ({width})")
    return _save(fig, ax, dst)


def histogram_plot(losses: np.ndarray, image_losses: np.ndarray, dst: Path) -> bool:
    """Histogram of one generation's candidate losses, with the per-image losses behind."""
    losses, image_losses = losses[np.isfinite(losses)], image_losses[np.isfinite(image_losses)]
    if losses.size == 0 and image_losses.size == 0:
        return False
    fig, ax = _axes("loss histogram", xlabel="loss", ylabel="count")
    both = np.concatenate([losses, image_losses])
    bins = np.histogram_bin_edges(both, bins=min(30, max(5, both.size // 2)))
    if image_losses.size:
        ax.hist(image_losses, bins=bins, color="tab:grey", alpha=0.5, label="per image")
    if losses.size:
        ax.hist(losses, bins=bins, color="tab:blue", alpha=0.8, label="per candidate")
    return _save(fig, ax, dst)


def token_plot(analysis, dst: Path) -> bool:
    """``embedpin analyze``'s table as a chart over the prompt's tokens: per token the change of
    the validation loss (% of the pinned loss) at weight 0, at 2× and with the token removed; the
    pinned weight and verdict under each token; the "tight" threshold as a dashed line."""
    rows = list(getattr(analysis, "rows", None) or [])
    if not rows:
        return False
    scale = max(abs(analysis.loss), 1e-12) / 100
    x = np.arange(len(rows))
    fig, ax = _axes("which tokens lock the result in", xlabel="", ylabel="validation loss change, % of pinned")
    fig.set_size_inches(max(5.4, 0.6 * len(rows) + 1.5), 3.6)
    ax.set_position((0.1, 0.22, 0.86, 0.68))
    for k, (key, label) in enumerate((("zero", "weight 0"), ("double", "weight 2×"), ("remove", "removed"))):
        ax.bar(x + (k - 1) * 0.27, [getattr(r, key) / scale for r in rows], width=0.27, color=f"C{k}", label=label,
               alpha=0.6 if key == "remove" else 0.9)
    ax.axhline(100 * analysis.tight, color="black", ls="--", lw=0.8, label=f"tight ≥ {100 * analysis.tight:g}%")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(x, [f"{r.token}\n{r.weight:.2f}\n{r.verdict}" for r in rows], fontsize=7)
    return _save(fig, ax, dst)
