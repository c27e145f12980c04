"""Accuracy vs fact popularity per (model, dataset): the paper's Fig. 4/5, plus the tail.

Left panel: accuracy on the top-x% most popular held-out facts (cumulative, the paper's
x-axis). Right panel: accuracy per popularity decile, where the rare tail is not averaged
away. Both panels put the most popular facts on the left. The finetuned subsets are lines
(mean over seeds) with a +/- 1 sd band; the base model answering zero-shot is dashed, its
cloze accuracy (what it stores) dotted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from factft.errors import FactftError
from factft.summary import LABELS, REFERENCES, SUBSETS, accuracy_by_percentile, collect_metrics
from factft.tables import atomic_path

# One colour and marker per subset in every figure (seaborn's colourblind palette; the
# markers keep lines apart in greyscale print).
_PALETTE = sns.color_palette("colorblind")
STYLES = {
    "top": dict(color=_PALETTE[0], marker="o", linestyle="-"),
    "bottom": dict(color=_PALETTE[1], marker="s", linestyle="-"),
    "random": dict(color=_PALETTE[2], marker="^", linestyle="-"),
    "whole": dict(color=_PALETTE[4], marker="D", linestyle="-"),
    "base": dict(color=_PALETTE[7], marker="", linestyle="--"),
    "cloze": dict(color="0.15", marker="", linestyle=":"),
}


def plot_accuracy_vs_popularity(data: pd.DataFrame, model: str, dataset: str) -> Figure:
    """The two-panel figure from one (model, dataset)'s rows of accuracy_by_percentile."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        figure = Figure(figsize=(11, 4.8), layout="constrained")
        top_ax, decile_ax = figure.subplots(1, 2, sharey=True)
        top = data[data["scope"] == "top"]
        # Decile x holds popularity percentiles (x - 10, x]; plotted at 110 - x, the most
        # popular tenth sits at 10, under the left panel's top-10% point.
        deciles = data[data["scope"] == "decile"].assign(x=lambda d: 110 - d["x"])
        for ax, panel in ((top_ax, top), (decile_ax, deciles)):
            for subset in SUBSETS + REFERENCES:
                _draw(ax, panel[panel["subset"] == subset].sort_values("x"), subset)
            ax.set_xlim(panel["x"].min() - 3, panel["x"].max() + 3)
        top_ax.set_xticks(sorted(top["x"].unique()))
        top_ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}%")
        top_ax.set_xlabel("held-out facts: the top x% most popular")
        top_ax.set_ylabel("held-out accuracy")
        top_ax.set_title("Top-x% most popular (cumulative, as in the paper's Fig. 4/5)")
        positions = sorted(deciles["x"].unique())
        labels = [f"{p - 10:g}–{p:g}%" for p in positions]
        decile_ax.set_xticks(positions, labels, rotation=30, ha="right", rotation_mode="anchor")
        decile_ax.set_xlabel("held-out facts: popularity decile (% from the most popular)")
        decile_ax.set_title("Per popularity decile (the rare tail on the right)")
        top_ax.set_ylim(bottom=0)
        figure.suptitle(f"{model} on {dataset}: held-out accuracy vs. fact popularity", fontweight="bold")
        present = [s for s in SUBSETS + REFERENCES if (data["subset"] == s).any()]
        figure.legend(
            handles=[Line2D([], [], label=LABELS[s], **STYLES[s]) for s in present],
            loc="outside lower center",
            ncol=len(present),
            frameon=False,
            title=_data_note(data),
            title_fontsize="small",
        )
    return figure


def _draw(ax, rows: pd.DataFrame, subset: str) -> None:
    if not rows.empty:
        draw_mean_and_band(ax, rows["x"], rows["mean"], rows["sd"], subset, label=LABELS[subset])


def draw_mean_and_band(ax, x, mean, sd, subset: str, label: str | None = None) -> None:
    """One subset's line in its fixed style, with a +/- sd band over seeds when there is spread."""
    style = STYLES[subset]
    ax.plot(x, mean, label=label, linewidth=2, markersize=5, **style)
    spread = sd.fillna(0)
    if (spread > 0).any():
        ax.fill_between(x, mean - spread, mean + spread, color=style["color"], alpha=0.2, linewidth=0)


def _data_note(data: pd.DataFrame) -> str:
    """How much data backs each line: test facts, seeds, what the band is."""
    runs = data.loc[data["subset"].isin(SUBSETS), "runs"]
    seeds = int(runs.max()) if len(runs) else 0
    n_test = int(data.loc[data["scope"] == "top", "n"].max())
    if seeds > 1:
        return f"{n_test} held-out facts; finetuned lines: mean over {seeds} seeds, bands: ± 1 sd"
    return f"{n_test} held-out facts; finetuned lines: {seeds} seed (no band)"


def save_figure(figure: Figure, path: str | Path) -> None:
    """Write the figure atomically; the format follows the file name (png, pdf)."""
    fmt = Path(path).suffix.lstrip(".")
    # No creation date in the PDF: the same metrics give the same bytes.
    metadata = {"CreationDate": None} if fmt == "pdf" else None
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=fmt, dpi=150, metadata=metadata)


def make_figures(sources: Iterable[Mapping], model: str, dataset: str, outputs: Iterable[str | Path]) -> None:
    """Read one (model, dataset)'s metrics sources and write the figure to each output path."""
    metrics = collect_metrics(sources)
    data = accuracy_by_percentile(metrics)
    data = data[(data["model"] == model) & (data["dataset"] == dataset)]
    if data.empty:
        raise FactftError(f"no metrics for model '{model}' on dataset '{dataset}' among the sources to plot")
    figure = plot_accuracy_vs_popularity(data, model, dataset)
    for path in outputs:
        save_figure(figure, path)
