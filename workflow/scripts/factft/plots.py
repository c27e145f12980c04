"""Accuracy vs fact popularity per (model, dataset): the paper's accuracy-by-popularity
plots, plus the tail; accuracy vs the size of the finetuning subset
(plot_accuracy_vs_subset_size, for sized subsets such as top25); the finetuning loss per
subset (plot_training_loss); and the overview of the whole grid (plot_overview).

Left panel: accuracy on the top-x% most popular held-out facts (cumulative). Middle:
accuracy per popularity decile, where the rare tail is not averaged away. Right: per decile,
the share of questions answered with the relation's commonest answer
(factft.metrics.relation_guess), the finetuned models' guessing against the gold answers'
own share. Every panel puts the most popular facts on the left. The finetuned subsets are
lines (mean over seeds) with a +/- 1 sd band; the base model answering zero-shot is dashed
grey, few-shot (evaluate.fewshot) dashed brown, its cloze accuracy (what it stores) dotted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from factft import subsets as subset_names
from factft.errors import FactftError
from factft.metrics import gold_metrics
from factft.popularity import SCORERS, Scorer
from factft.summary import GAP, LABELS, REFERENCES, SUBSETS, accuracy_by_percentile, collect_metrics, read_summary
from factft.tables import atomic_path, read_table, read_tsv

# One colour and marker per subset in every figure (seaborn's colourblind palette; the
# markers keep lines apart in greyscale print).
_PALETTE = sns.color_palette("colorblind")
STYLES = {
    "top": dict(color=_PALETTE[0], marker="o", linestyle="-"),
    "bottom": dict(color=_PALETTE[1], marker="s", linestyle="-"),
    "random": dict(color=_PALETTE[2], marker="^", linestyle="-"),
    "whole": dict(color=_PALETTE[4], marker="D", linestyle="-"),
    "base": dict(color=_PALETTE[7], marker="", linestyle="--"),
    "fewshot": dict(color=_PALETTE[5], marker="", linestyle="--"),
    "cloze": dict(color="0.15", marker="", linestyle=":"),
    "gold": dict(color="0.5", marker="", linestyle="-."),
}
# One number, two readings: the share of gold answers that are their relation's commonest
# (given at least twice; guess panel), and the accuracy of always answering it (decile panel):
# the guessing floor. They differ only where a relation's gold answers all differ: the line
# shows 0 there, where always answering one of them would be right once.
GOLD_LABEL = "Gold: relation's commonest answer"
# How each kind of subset picks its facts (the subset-size figure's legend).
_SELECTION = {"top": "most popular first", "bottom": "least popular first", "random": "seeded sample"}


def plot_accuracy_vs_popularity(
    data: pd.DataFrame, model: str, dataset: str, gold: pd.DataFrame | None = None, scorer: str = "column"
) -> Figure:
    """The three-panel figure from one (model, dataset)'s rows of accuracy_by_percentile;
    `gold` (factft.metrics.gold_metrics of the test split) draws the guessing reference;
    `scorer` (the dataset's popularity.scorer) names what ranks the facts on the axes.
    """
    # Where a model's confidence stands in for popularity (MMLU has none), the axes say so.
    ranking, ranked_first = SCORERS[scorer].ranking if scorer in SCORERS else Scorer.ranking
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        figure = Figure(figsize=(16, 4.8), layout="constrained")
        top_ax, decile_ax, guess_ax = figure.subplots(1, 3)
        decile_ax.sharey(top_ax)
        top = data[data["scope"] == "top"]
        deciles = data[data["scope"] == "decile"].assign(x=lambda d: _decile_position(d["x"]))
        for ax, panel in ((top_ax, top), (decile_ax, deciles)):
            for subset in SUBSETS + REFERENCES:
                _draw(ax, panel[panel["subset"] == subset].sort_values("x"), subset)
            ax.set_xlim(panel["x"].min() - 3, panel["x"].max() + 3)
        for subset in SUBSETS:
            rows = deciles[deciles["subset"] == subset].sort_values("x")
            if not rows.empty:
                draw_mean_and_band(
                    guess_ax, rows["x"], rows["guess_mean"], rows["guess_sd"], subset, label=LABELS[subset]
                )
        if gold is not None:
            reference = gold[gold["scope"] == "decile"].assign(x=lambda d: _decile_position(d["x"]))
            reference = reference.sort_values("x")
            for ax in (decile_ax, guess_ax):
                ax.plot(reference["x"], reference["relation_guess"], label=GOLD_LABEL, linewidth=2, **STYLES["gold"])
        guess_ax.set_xlim(deciles["x"].min() - 3, deciles["x"].max() + 3)
        guess_ax.set_ylim(0, 1.02)
        top_ax.set_xticks(sorted(top["x"].unique()))
        top_ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}%")
        top_ax.set_xlabel(f"held-out facts: the top x% {ranked_first}")
        top_ax.set_ylabel("held-out accuracy")
        top_ax.set_title(f"Top-x% {ranked_first} (cumulative, as in the paper)")
        positions = sorted(deciles["x"].unique())
        labels = [f"{p - 10:g}–{p:g}%" for p in positions]
        for ax in (decile_ax, guess_ax):
            ax.set_xticks(positions, labels, rotation=30, ha="right", rotation_mode="anchor")
        decile_ax.set_xlabel(f"held-out facts: {ranking} decile (% from the {ranked_first})")
        guess_ax.set_xlabel(f"held-out facts: {ranking} decile")
        decile_ax.set_title(f"Per {ranking} decile (the tail on the right)")
        guess_ax.set_ylabel("share answered with\nthe relation's commonest answer")
        guess_ax.set_title("Guessing from the relation, per decile")
        # Just below 0: a reference line at zero accuracy (a base model never trained on
        # QA prompts) stays visible above the axis.
        top_ax.set_ylim(bottom=-0.02)
        figure.suptitle(f"{model} on {dataset}: held-out accuracy vs. fact {ranking}", fontweight="bold")
        present = [s for s in SUBSETS + REFERENCES if (data["subset"] == s).any()]
        handles = [Line2D([], [], label=LABELS[s], **STYLES[s]) for s in present]
        if gold is not None:
            handles.append(Line2D([], [], label=GOLD_LABEL, **STYLES["gold"]))
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncol=len(handles),
            frameon=False,
            title=_data_note(data),
            title_fontsize="small",
        )
    return figure


def _decile_position(x: pd.Series) -> pd.Series:
    """Decile x holds popularity percentiles (x - 10, x]; plotted at 110 - x, the most popular
    tenth sits at 10, under the left panel's top-10% point."""
    return 110 - x


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
    # The deciles part the test set (a top-x% bin is all of it only where x is 100).
    n_test = int(data[data["scope"] == "decile"].groupby("subset")["n"].sum().max())
    if seeds > 1:
        return f"{n_test} held-out facts; finetuned lines: mean over {seeds} seeds, bands: ± 1 sd"
    return f"{n_test} held-out facts; finetuned lines: {seeds} seed (no band)"


def save_figure(figure: Figure, paths: Iterable[str | Path]) -> None:
    """Write the figure to each path atomically; the format follows the file name (png, pdf)."""
    for path in paths:
        fmt = Path(path).suffix.lstrip(".")
        # No creation date in the PDF: the same metrics give the same bytes.
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=fmt, dpi=150, metadata=metadata)


def make_figures(
    sources: Iterable[Mapping],
    model: str,
    dataset: str,
    outputs: Iterable[str | Path],
    test: str | Path | None = None,
    scorer: str = "column",
) -> None:
    """Read one (model, dataset)'s metrics sources and write the figure to each output path;
    `test`, the dataset's test split, gives the gold answers' guessing reference; `scorer`
    the dataset's popularity.scorer."""
    metrics = collect_metrics(sources)
    data = accuracy_by_percentile(metrics)
    data = data[(data["model"] == model) & (data["dataset"] == dataset)]
    if data.empty:
        raise FactftError(f"no metrics for model '{model}' on dataset '{dataset}' among the sources to plot")
    gold = None if test is None else gold_metrics(read_table(test), percentiles=())
    figure = plot_accuracy_vs_popularity(data, model, dataset, gold, scorer)
    save_figure(figure, outputs)


def plot_accuracy_vs_subset_size(metrics: pd.DataFrame, model: str, dataset: str, fraction: float) -> Figure:
    """Held-out accuracy (left) and guessing from the relation (right) against the share of
    the pool a subset takes, one line per selection (top, bottom, random: mean over seeds,
    +/- 1 sd band, seeds as dots). At 100% every selection is the whole pool, so the lines
    meet at FT-Whole. The base model's zero-shot and few-shot QA are dashed, its cloze
    accuracy dotted.
    `fraction` is split.fraction: the share of top, bottom and random. A sized random subset
    of that share (random50 at 0.5) is a second draw of it: one point averages both draws' runs.
    """
    overall = metrics[(metrics["scope"] == "all") & (metrics["model"] == model) & (metrics["dataset"] == dataset)]
    finetuned = overall[overall["subset"].map(subset_names.is_subset)]
    if finetuned.empty:
        raise FactftError(f"no finetuned runs of model '{model}' on dataset '{dataset}' to plot against subset size")
    runs = finetuned.assign(
        kind=finetuned["subset"].map(lambda name: subset_names.parse(name)[0]),
        share=finetuned["subset"].map(lambda name: 100 * subset_names.pool_share(name, fraction)),
    )
    whole = runs[runs["kind"] == "whole"]
    kinds = [k for k in ("top", "bottom", "random") if (runs["kind"] == k).any()]
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        figure = Figure(figsize=(12, 4.8), layout="constrained")
        accuracy_ax, guess_ax = figure.subplots(1, 2)
        for ax, column in ((accuracy_ax, "accuracy"), (guess_ax, "relation_guess")):
            for kind in kinds:
                # The whole pool ends every selection's line: at 100% they are one table.
                rows = pd.concat([runs[runs["kind"] == kind], whole])
                by_share = rows.groupby("share")[column].agg(["mean", "std"]).reset_index()
                draw_mean_and_band(ax, by_share["share"], by_share["mean"], by_share["std"], kind)
                ax.scatter(rows["share"], rows[column], s=9, color=STYLES[kind]["color"], alpha=0.6, zorder=3)
            if not whole.empty:
                ax.plot(100, whole[column].mean(), markersize=9, zorder=4, **STYLES["whole"])
            ax.set_xscale("log")
            shares = sorted(runs["share"].unique())
            ax.set_xticks(shares, [f"{share:g}%" for share in shares])
            ax.minorticks_off()
            ax.set_xlabel("finetuning subset: share of the pool (log scale; 100% = FT-Whole)")
        for reference in REFERENCES:
            value = overall.loc[overall["subset"] == reference, "accuracy"]
            if len(value):
                accuracy_ax.axhline(value.iloc[0], linewidth=1.5, **STYLES[reference])
        accuracy_ax.set_ylabel("held-out accuracy")
        accuracy_ax.set_title("Held-out accuracy")
        guess_ax.set_ylim(0, 1.02)
        guess_ax.set_ylabel("share answered with\nthe relation's commonest answer")
        guess_ax.set_title("Guessing from the relation")
        figure.suptitle(
            f"{model} on {dataset}: held-out accuracy vs. the amount of finetuning data", fontweight="bold"
        )
        present = [*kinds, *(["whole"] if not whole.empty else [])]
        present += [r for r in REFERENCES if (overall["subset"] == r).any()]
        handles = [
            Line2D([], [], label=f"{LABELS[s]} ({_SELECTION[s]})" if s in _SELECTION else LABELS[s], **STYLES[s])
            for s in present
        ]
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 4),
            frameon=False,
            title=f"{int(overall['n'].max())} held-out facts; "
            "lines: mean over seeds, bands: ± 1 sd, dots: single seeds",
            title_fontsize="small",
        )
    return figure


def make_size_figure(
    sources: Iterable[Mapping], model: str, dataset: str, fraction: float, outputs: Iterable[str | Path]
) -> None:
    """Read one (model, dataset)'s metrics sources and write the subset-size figure to each path."""
    figure = plot_accuracy_vs_subset_size(collect_metrics(sources), model, dataset, fraction)
    save_figure(figure, outputs)


def plot_overview(metrics: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """The whole grid at a glance (the paper's results table as a figure): one panel per dataset,
    per model a bar per finetuning subset (mean over seeds, +/- 1 sd) with each seed as a
    dot, and above the model's bars FT-Top - FT-Bottom from `summary` (summary.tsv: mean over
    the seeds with both, and its 95% bootstrap interval over test subjects where it has one).
    """
    gaps = summary.set_index(["model", "dataset"])
    has_interval = gaps[f"{GAP}_ci_low"].notna().any()
    overall = metrics[(metrics["scope"] == "all") & metrics["subset"].isin(SUBSETS)]
    datasets = list(dict.fromkeys(overall["dataset"]))
    models = list(dict.fromkeys(overall["model"]))
    subsets = [s for s in SUBSETS if (overall["subset"] == s).any()]
    palette = {s: STYLES[s]["color"] for s in subsets}
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        # Wide enough for the legend under a single panel.
        width = max(8.0, 1.5 + len(datasets) * (1.2 + 1.8 * len(models)))
        figure = Figure(figsize=(width, 4.6), layout="constrained")
        axes = figure.subplots(1, len(datasets), sharey=True, squeeze=False)[0]
        for ax, dataset in zip(axes, datasets):
            data = overall[overall["dataset"] == dataset]
            common = dict(data=data, x="model", y="accuracy", hue="subset", order=models, hue_order=subsets, ax=ax)
            sns.barplot(**common, palette=palette, saturation=1, errorbar="sd", capsize=0.1, err_kws={"linewidth": 1})
            # No jitter: seaborn draws it from numpy's global generator, so the same runs would
            # give another file each time.
            dots = {s: "0.15" for s in subsets}
            sns.stripplot(**common, dodge=True, jitter=False, palette=dots, size=3, legend=False)
            for position, model in enumerate(models):
                if not (data["model"] == model).any():  # a pair the grid leaves out: not a zero
                    ax.annotate(
                        "not run", (position, 0.02), xycoords=("data", "axes fraction"), ha="center", color="0.4"
                    )
                    continue
                gap = gaps.loc[(model, dataset)] if (model, dataset) in gaps.index else None
                if gap is None or pd.isna(gap[f"{GAP}_mean"]):
                    continue
                text = f"Δ {gap[f'{GAP}_mean']:+.2f}"
                if pd.notna(gap[f"{GAP}_ci_low"]):
                    text += f"\n[{gap[f'{GAP}_ci_low']:+.2f}, {gap[f'{GAP}_ci_high']:+.2f}]"
                ax.annotate(
                    text,
                    (position, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize="small",
                )
            ax.set_title(dataset, pad=32 if has_interval else 18)
            ax.set_xlabel("")
            ax.get_legend().remove()
        axes[0].set_ylabel("held-out accuracy")
        figure.legend(
            handles=[Line2D([], [], label=LABELS[s], color=palette[s], linewidth=8) for s in subsets],
            loc="outside lower center",
            ncol=len(subsets),
            frameon=False,
            title="bars: mean over seeds, ± 1 sd; dots: single seeds\nΔ: FT-Top − FT-Bottom, mean over seeds"
            + (" [95% bootstrap interval over test subjects]" if has_interval else ""),
            title_fontsize="small",
        )
    return figure


def make_overview(sources: Iterable[Mapping], summary: str | Path, outputs: Iterable[str | Path]) -> None:
    """Read every metrics source of the grid and summary.tsv (the gap) and write the overview
    figure to each output path."""
    figure = plot_overview(collect_metrics(sources), read_summary(summary))
    save_figure(figure, outputs)


# ---- finetuning loss ----------------------------------------------------------------

TRAIN_LOG_COLUMNS = ("step", "epoch", "loss")


def read_train_logs(sources: Iterable[Mapping]) -> pd.DataFrame:
    """Every source's train_log.tsv (factft.train, a row per optimizer step), keyed by its
    subset and seed; a log without steps is an error naming the file."""
    tables = []
    for source in sources:
        path = source["path"]
        table = read_tsv(path, "train log")
        missing = [c for c in TRAIN_LOG_COLUMNS if c not in table.columns]
        if missing or table.empty:
            raise FactftError(f"train log {path}: " + (f"no columns {missing}" if missing else "no steps"))
        tables.append(table.assign(subset=source["subset"], seed=source["seed"]))
    if not tables:
        raise FactftError("no train logs to plot: the config lists no subset or seed")
    return pd.concat(tables, ignore_index=True)


def training_curves(logs: pd.DataFrame, spans: int = 40) -> pd.DataFrame:
    """Per subset, the loss in `spans` equal runs of steps (their mean: single steps are
    noisy), then mean and sd over seeds: columns subset, span, epoch, mean, sd, seeds."""
    per_run = []
    for (subset, seed), run in logs.groupby(["subset", "seed"], sort=False):
        run = run.sort_values("step")
        count = min(spans, len(run))
        span = np.arange(len(run)) * count // len(run)
        means = run.groupby(span)[["epoch", "loss"]].mean()
        per_run.append(means.rename_axis("span").reset_index().assign(subset=subset, seed=seed))
    runs = pd.concat(per_run, ignore_index=True)
    curves = runs.groupby(["subset", "span"], sort=False).agg(
        epoch=("epoch", "mean"), mean=("loss", "mean"), sd=("loss", "std"), seeds=("seed", "nunique")
    )
    return curves.reset_index()


def final_losses(logs: pd.DataFrame, share: float = 0.1) -> pd.Series:
    """Per subset, the mean loss over the last `share` of each run's steps, mean over seeds."""
    last = []
    for (subset, seed), run in logs.groupby(["subset", "seed"], sort=False):
        tail = run.sort_values("step").tail(max(1, math.ceil(share * len(run))))
        last.append((subset, tail["loss"].mean()))
    return pd.DataFrame(last, columns=["subset", "loss"]).groupby("subset", sort=False)["loss"].mean()


def log_ticks(low: float, high: float) -> list[float]:
    """At least three labelled ticks for a log axis from `low` to `high`: round values (1, 2, 5
    x 10^k) where the range holds three, finer ones in a narrower range."""
    for multiples in ((1, 2, 5), range(1, 10)):
        ticks = [m * 10.0**e for e in range(-4, 4) for m in multiples if low <= m * 10.0**e <= high]
        if len(ticks) >= 3:
            return ticks
    return [float(f"{t:.3g}") for t in np.geomspace(low, high, 5)[1:-1]]


def plot_training_loss(logs: pd.DataFrame, model: str, dataset: str) -> Figure:
    """Finetuning loss (answer tokens) against epochs over each subset's own facts: shows
    which subset the model fits worse (facts it does not store must be memorised) and tells
    a run that did not converge from one that trained but generalises worse."""
    curves, final = training_curves(logs), final_losses(logs)
    names = [s for s in SUBSETS if s in set(curves["subset"])]
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        figure = Figure(figsize=(7.5, 4.8), layout="constrained")
        ax = figure.subplots()
        for subset in names:
            rows = curves[curves["subset"] == subset]
            label = f"{LABELS[subset]} ({final[subset]:.2f})"
            draw_mean_and_band(ax, rows["epoch"], rows["mean"], rows["sd"], subset, label=label)
        seeds = int(curves["seeds"].max())
        ax.set_xlabel("epoch (passes over the subset's own facts)")
        ax.set_ylabel("finetuning loss on the answer tokens")
        # Log: the first steps' loss is ten times the end's, where the subsets differ.
        ax.set_yscale("log")
        ticks = log_ticks(*ax.get_ylim())
        ax.set_yticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{model} on {dataset}: how well each subset is fitted")
        spread = f"mean over {seeds} seeds, bands: ± 1 sd" if seeds > 1 else "one seed"
        title = f"{spread}\nin brackets: loss over the last tenth of steps"
        ax.legend(title=title, title_fontsize="small", frameon=False)
    return figure


def make_training_figure(
    sources: Iterable[Mapping], model: str, dataset: str, outputs: Iterable[str | Path]
) -> None:
    """Read one (model, dataset)'s train logs and write the loss figure to each output path."""
    figure = plot_training_loss(read_train_logs(sources), model, dataset)
    save_figure(figure, outputs)
