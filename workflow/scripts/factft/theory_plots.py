"""Tables and figures over the theory model's results (factft.theory): the paper's Fig. 2.

Kept apart from factft.theory so that these run without torch (envs/figures.yaml).
Fig. 2a: held-out accuracy per finetuning subset at the base point. Fig. 2b/2c: FT-Top minus
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
from factft.plots import STYLES, save_figure
from factft.tables import read_table, write_tsv

SUBSETS = ("top", "bottom", "random", "whole")
LABELS = {"top": "FT-Top", "bottom": "FT-Bottom", "random": "FT-Random", "whole": "FT-Whole"}
SETTING_LABELS = {
    "zipf": "Zipf exponent of subject popularity",
    "pretrain_steps": "pretraining steps",
    "finetune_steps": "finetuning steps",
    "answer_zipf": "skew of the answer pools",
    "qa_similarity": "similarity of QA and statement tokens",
    "subjects": "subjects",
}


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


def _seed_note(table: pd.DataFrame) -> str:
    seeds = sorted(table["seed"].unique())
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): dots, bars/lines: mean"


def plot_subsets(accuracy: pd.DataFrame) -> Figure:
    """Fig. 2a: held-out QA accuracy per subset, with what the pretrained model stores."""
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    ax = figure.subplots()
    for i, subset in enumerate(SUBSETS):
        rows = accuracy[accuracy["subset"] == subset]
        color = STYLES[subset]["color"]
        ax.bar(i, rows["accuracy"].mean(), color=color, alpha=0.8, width=0.7)
        jitter = np.linspace(-0.15, 0.15, len(rows)) if len(rows) > 1 else [0.0]
        ax.scatter(i + np.asarray(jitter), rows["accuracy"], color="0.1", s=14, zorder=3)
    stored = accuracy.drop_duplicates("seed")
    ax.axhline(stored["stored"].mean(), color="0.15", linestyle=":", label="stored in pretraining (salience)")
    ax.axhline(stored["pretrained_accuracy"].mean(), color="0.5", linestyle="--", label="pretrained, statement format")
    ax.set_xticks(range(len(SUBSETS)), [LABELS[s] for s in SUBSETS])
    ax.set_ylabel("held-out QA accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"One-layer model: finetuning subsets\n{_seed_note(accuracy)}", fontsize=9)
    return figure


def plot_gap(gap: pd.DataFrame, setting: str) -> Figure:
    """Fig. 2b/2c: FT-Top minus FT-Bottom held-out accuracy against the swept setting."""
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    ax = figure.subplots()
    values = gap["value"].astype(float)
    mean = gap.assign(value=values).groupby("value")[["gap", "gap_head"]].mean()
    ax.scatter(values, gap["gap"], color=STYLES["top"]["color"], s=14, alpha=0.6)
    ax.plot(mean.index, mean["gap"], color=STYLES["top"]["color"], marker="o", label="all test facts")
    ax.plot(mean.index, mean["gap_head"], color="0.4", marker="s", linestyle="--", label="more mentioned half")
    ax.axhline(0, color="0.6", linewidth=0.8)
    if values.min() > 0 and values.max() / values.min() >= 8:
        ax.set_xscale("log")
    ax.set_xlabel(SETTING_LABELS.get(setting, setting))
    ax.set_ylabel("FT-Top minus FT-Bottom accuracy")
    ax.legend(fontsize=8)
    ax.set_title(f"Gap against {setting}\n{_seed_note(gap)}", fontsize=9)
    return figure


def plot_salience(salience: pd.DataFrame) -> Figure:
    """Salience S(s, r, a) of each fact's true answer after pretraining, against mentions."""
    figure = Figure(figsize=(5.5, 4), layout="constrained")
    ax = figure.subplots()
    roles = {"top": STYLES["top"]["color"], "bottom": STYLES["bottom"]["color"], "test": "0.35", "pool": "0.75"}
    names = {"top": "FT-Top subjects", "bottom": "FT-Bottom subjects", "test": "test subjects", "pool": "rest of pool"}
    for role, color in roles.items():
        rows = salience[salience["role"] == role]
        if rows.empty:
            continue
        ax.scatter(rows["mentions"], rows["salience"], s=6, alpha=0.5, color=color, label=names[role])
    ax.set_xscale("log")
    ax.set_xlabel("statements about the subject in pretraining")
    ax.set_ylabel(r"salience $\phi(a)^\top W_V \phi(s)$ of the true answer")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"Salience after pretraining, {len(salience['seed'].unique())} seeds pooled", fontsize=9)
    return figure


def plot_attention(attention: pd.DataFrame) -> Figure:
    """Attention on the subject token, and held-out accuracy, through finetuning."""
    figure = Figure(figsize=(9, 3.8), layout="constrained")
    left, right = figure.subplots(1, 2)
    for subset in SUBSETS:
        rows = attention[attention["subset"] == subset]
        mean = rows.groupby("step")[["test_attention_subject", "test_accuracy"]].mean()
        style = dict(color=STYLES[subset]["color"], label=LABELS[subset])
        if subset in ("random", "whole"):
            style.update(alpha=0.5, linestyle="--")
        left.plot(mean.index, mean["test_attention_subject"], **style)
        right.plot(mean.index, mean["test_accuracy"], **style)
    left.axhline(0.5, color="0.7", linewidth=0.8)
    left.set_ylim(0, 1)
    left.set_ylabel("attention on the subject (held-out facts)")
    right.set_ylabel("held-out QA accuracy")
    for ax in (left, right):
        ax.set_xlabel("finetuning step")
    left.legend(fontsize=8)
    figure.suptitle(f"Through finetuning, mean over {len(attention['seed'].unique())} seeds", fontsize=9)
    return figure


def write_sweep_tables(accuracy_paths: Iterable[str | Path], outputs, sweep: str, values: list) -> None:
    """Read a sweep's per-point accuracy tables; write accuracy, gap and gap_summary (tsv).

    Each table is tagged with the sweep and its value here: a point at the base settings
    reads the base run's table (factft.simulation.run_of), tagged as the base point.
    """
    tables = [
        table.assign(sweep=sweep, value=value)
        for table, value in zip(read_tables(accuracy_paths), values, strict=True)
    ]
    for name, table in sweep_tables(tables).items():
        write_tsv(table, outputs[name])


def save(figure: Figure, paths: Iterable[str | Path]) -> None:
    """Write the figure to each path (png, pdf), atomically."""
    for path in paths:
        save_figure(figure, path)
