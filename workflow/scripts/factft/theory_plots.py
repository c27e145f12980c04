"""Tables and figures over the theory model's results (factft.theory): the paper's theory experiments.

Kept apart from factft.theory so that these run without torch (envs/figures.yaml).
The subsets figure: held-out accuracy per finetuning subset at the base point. The gap figures: FT-Top minus
FT-Bottom against a swept setting (Zipf exponent, pretraining steps). Mechanism: salience
against pretraining mentions, and the attention on the subject through finetuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from factft.errors import FactftError
from factft.plots import STYLES
from factft.summary import LABELS, SUBSETS
from factft.tables import read_table, write_tsv

SETTING_LABELS = {
    "zipf": "Zipf exponent of subject popularity",
    "pretrain_steps": "pretraining steps",
    "finetune_steps": "finetuning steps",
    "answer_zipf": "skew of the answer pools",
    "qa_similarity": "similarity of QA and statement tokens",
    "subjects": "subjects",
}
GAP_COLOR = "0.1"


def read_tables(paths: Iterable[str | Path]) -> list[pd.DataFrame]:
    return [read_table(path) for path in paths]


def sweep_tables(accuracy: list[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One sweep's accuracy tables (every point and seed) as the tables we report.

    `accuracy`: long, one row per (value, seed, subset). `gap`: one row per (value, seed),
    accuracy per subset side by side and FT-Top minus FT-Bottom, overall and on the more
    mentioned half of the test subjects. `gap_summary`: per value, means over seeds, the sd
    of the gap, and in how many seeds FT-Top beat FT-Bottom.
    """
    if not accuracy:
        raise FactftError("no simulation accuracy tables to summarize")
    long = pd.concat(accuracy, ignore_index=True)
    # Swept settings are numbers; the base point has none (NaN, kept as a group key).
    long["value"] = pd.to_numeric(long["value"])
    long = long.sort_values(["value", "seed", "subset"], kind="stable")
    keys = ["sweep", "value", "seed"]
    indexed = long.set_index([*keys, "subset"])
    wide = indexed["accuracy"].unstack("subset").reindex(columns=list(SUBSETS))
    head = indexed["accuracy_head"].unstack("subset")
    gap = wide.assign(gap=wide["top"] - wide["bottom"], gap_head=head["top"] - head["bottom"])
    gap = gap.reset_index().rename_axis(columns=None)
    summary = (
        gap.groupby(["sweep", "value"], dropna=False)
        .agg(
            top=("top", "mean"),
            bottom=("bottom", "mean"),
            random=("random", "mean"),
            whole=("whole", "mean"),
            gap=("gap", "mean"),
            gap_sd=("gap", "std"),
            gap_head=("gap_head", "mean"),
            seeds=("seed", "count"),
            seeds_top_above=("gap", lambda g: int((g > 0).sum())),
        )
        .reset_index()
    )
    return {"accuracy": long.reset_index(drop=True), "gap": gap, "gap_summary": summary}


def _over_seeds(table: pd.DataFrame, many: str) -> str:
    """`many` with its {n} seeds filled in, or "one seed"."""
    seeds = table["seed"].nunique()
    return many.format(n=seeds) if seeds > 1 else "one seed"


def _seed_note(table: pd.DataFrame, mean_as: str) -> str:
    seeds = sorted(table["seed"].unique())
    if len(seeds) == 1:
        return f"one seed ({seeds[0]})"
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); dots: single seeds, {mean_as}: mean over seeds"


def _legend_below(figure: Figure, ncol: int, **options) -> None:
    """One legend for all panels, under them, where it cannot cover data (as factft.plots does);
    `options` go to Figure.legend."""
    entries = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    figure.legend(
        entries.values(),
        entries.keys(),
        loc="outside lower center",
        ncol=ncol,
        frameon=False,
        fontsize=8,
        title_fontsize=8,
        **options,
    )


def plot_subsets(accuracy: pd.DataFrame) -> Figure:
    """The subsets figure: held-out QA accuracy per subset, with what the pretrained model stores."""
    figure = Figure(figsize=(5.5, 4.6), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(SUBSETS))
    per_seed = accuracy.pivot_table(index="seed", columns="subset", values="accuracy")[list(SUBSETS)]
    ax.bar(positions, per_seed.mean(), color=[STYLES[s]["color"] for s in SUBSETS], alpha=0.8, width=0.7)
    # Seeds are independent worlds: their spread can hide a gap that every seed shows, so a
    # seed keeps its offset in every bar and a line joins its dots.
    offsets = np.linspace(-0.15, 0.15, len(per_seed)) if len(per_seed) > 1 else [0.0]
    for i, (offset, (_, seed_accuracy)) in enumerate(zip(offsets, per_seed.iterrows())):
        ax.plot(
            positions + offset,
            seed_accuracy,
            color="0.45",
            linewidth=0.8,
            marker="o",
            markersize=4,
            markerfacecolor="0.1",
            markeredgecolor="0.1",
            zorder=3,
            label="one seed" if i == 0 else None,
        )
    stored = accuracy.drop_duplicates("seed")
    ax.axhline(stored["stored"].mean(), color="0.15", linestyle=":", label="stored in pretraining (salience)")
    ax.axhline(stored["pretrained_accuracy"].mean(), color="0.5", linestyle="--", label="pretrained, statement format")
    ax.set_xticks(positions, [LABELS[s] for s in SUBSETS])
    ax.set_ylabel("held-out QA accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("One-layer model: finetuning subsets", fontsize=9)
    _legend_below(figure, ncol=2, title=_seed_note(accuracy, "bars"))
    return figure


def plot_gap(gap: pd.DataFrame, setting: str) -> Figure:
    """A gap figure: FT-Top minus FT-Bottom held-out accuracy against the swept setting (left),
    and the two accuracies it is the difference of (right)."""
    figure = Figure(figsize=(9, 4.4), layout="constrained")
    gap_ax, accuracy_ax = figure.subplots(1, 2, sharex=True)
    gap = gap.assign(value=gap["value"].astype(float))
    mean = gap.groupby("value")[["gap", "gap_head", "top", "bottom"]].mean()
    # Black and grey: the gap is no subset, and the subset colours are FT-Top's and FT-Bottom's
    # own accuracies on the right.
    gap_ax.scatter(gap["value"], gap["gap"], color=GAP_COLOR, s=14, alpha=0.4)
    gap_ax.plot(mean.index, mean["gap"], color=GAP_COLOR, marker="o", label="gap, all test facts")
    gap_ax.plot(
        mean.index, mean["gap_head"], color="0.55", marker="s", linestyle="--", label="gap, more mentioned half"
    )
    gap_ax.axhline(0, color="0.6", linewidth=0.8)
    gap_ax.set_ylabel("FT-Top minus FT-Bottom accuracy")
    # A gap near 0 can mean both subsets fail or both are at the ceiling: the absolute
    # accuracies tell which.
    for subset in ("top", "bottom"):
        style = STYLES[subset]
        accuracy_ax.scatter(gap["value"], gap[subset], color=style["color"], marker=style["marker"], s=14, alpha=0.4)
        accuracy_ax.plot(mean.index, mean[subset], label=LABELS[subset], **style)
    accuracy_ax.set_ylim(0, 1.05)
    accuracy_ax.set_ylabel("held-out QA accuracy")
    values = mean.index
    if values.min() > 0 and values.max() / values.min() >= 8:
        gap_ax.set_xscale("log")
    # The axes are shared: these ticks hold for both panels.
    gap_ax.set_xticks(values, [f"{v:g}" for v in values])
    gap_ax.set_xticks([], minor=True)
    label = SETTING_LABELS.get(setting, setting)
    for ax in (gap_ax, accuracy_ax):
        ax.set_xlabel(label)
    figure.suptitle(f"One-layer model: FT-Top minus FT-Bottom against {label}", fontsize=9)
    _legend_below(figure, ncol=4, title=_seed_note(gap, "lines"))
    return figure


def plot_salience(salience: pd.DataFrame) -> Figure:
    """Salience S(s, r, a) of each fact's true answer after pretraining, against mentions."""
    figure = Figure(figsize=(5.5, 4.6), layout="constrained")
    ax = figure.subplots()
    # Test and pool subjects lie underneath, small and faint: they share the mention range of
    # both finetuning subsets and would hide them.
    roles = {
        "top": dict(color=STYLES["top"]["color"], marker=STYLES["top"]["marker"], s=7, alpha=0.6, zorder=2),
        "bottom": dict(color=STYLES["bottom"]["color"], marker=STYLES["bottom"]["marker"], s=7, alpha=0.6, zorder=2),
        "test": dict(color="0.35", marker="o", s=4, alpha=0.4, zorder=1),
        "pool": dict(color="0.75", marker="o", s=4, alpha=0.4, zorder=1),
    }
    names = {"top": "FT-Top subjects", "bottom": "FT-Bottom subjects", "test": "test subjects", "pool": "rest of pool"}
    for role, style in roles.items():
        rows = salience[salience["role"] == role]
        if rows.empty:
            continue
        ax.scatter(rows["mentions"], rows["salience"], label=names[role], **style)
    ax.set_xscale("log")
    ax.set_xlabel("statements about the subject in pretraining")
    ax.set_ylabel(r"salience $\phi(a)^\top W_V \phi(s)$ of the true answer")
    ax.set_title(f"Salience after pretraining, {_over_seeds(salience, '{n} seeds pooled')}", fontsize=9)
    _legend_below(figure, ncol=4, markerscale=2)
    return figure


def plot_attention(attention: pd.DataFrame) -> Figure:
    """Attention on the subject token, and held-out accuracy, through finetuning."""
    figure = Figure(figsize=(9, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for subset in SUBSETS:
        rows = attention[attention["subset"] == subset]
        mean = rows.groupby("step")[["test_attention_subject", "test_accuracy"]].mean()
        style = dict(label=LABELS[subset], markersize=4, markevery=2, **STYLES[subset])
        left.plot(mean.index, mean["test_attention_subject"], **style)
        right.plot(mean.index, mean["test_accuracy"], **style)
    left.axhline(0.5, color="0.7", linewidth=0.8, label="even split: subject and relation token")
    left.set_ylabel("attention on the subject (held-out facts)")
    right.set_ylabel("held-out QA accuracy")
    # Both are shares (of attention, of facts): one 0-1 scale keeps their changes comparable.
    for ax in (left, right):
        ax.set_ylim(0, 1)
        ax.set_xlabel("finetuning step")
    figure.suptitle(f"Through finetuning, {_over_seeds(attention, 'mean over {n} seeds')}", fontsize=9)
    _legend_below(figure, ncol=len(SUBSETS) + 1)
    return figure


def write_sweep_tables(accuracy_paths: Iterable[str | Path], outputs, sweep: str, values: list) -> None:
    """Read a sweep's per-point accuracy tables; write accuracy, gap and gap_summary (tsv).

    Each table is tagged with the sweep and its value here: a point at the base settings
    reads the base run's table (factft.sweeps.run_of), tagged as the base point.
    """
    tables = [
        table.assign(sweep=sweep, value=value)
        for table, value in zip(read_tables(accuracy_paths), values, strict=True)
    ]
    for name, table in sweep_tables(tables).items():
        write_tsv(table, outputs[name])
