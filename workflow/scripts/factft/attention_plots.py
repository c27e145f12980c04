"""The attention figures (the `attention_figures` rule) from the tables factft.attention
writes: per layer, where the last prompt position looks under each finetuning subset, and one
question's attention map per subset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from factft.errors import FactftError
from factft.plots import STYLES, draw_mean_and_band, save_figure
from factft.summary import LABELS, SUBSETS
from factft.tables import read_tsv

PARTS = {"subject_max": "the subject's tokens", "relation_max": "the relation's words"}


def read_attention(sources: Iterable[Mapping]) -> pd.DataFrame:
    """The per-layer tables of `sources` (dicts with subset, seed, path), labelled."""
    tables = []
    for source in sources:
        path = Path(source["path"])
        if not path.is_file():
            raise FactftError(f"attention table {path} is missing; run the `attention` rule for it")
        tables.append(read_tsv(path, "attention table").assign(subset=source["subset"], seed=source["seed"]))
    if not tables:
        raise FactftError("no attention tables to plot: the config has no subsets or seeds")
    return pd.concat(tables, ignore_index=True)


def plot_attention_by_layer(data: pd.DataFrame, model: str, dataset: str):
    """Per layer, the head-mean max attention on the subject (left) and on the
    relation's words (middle), one line per subset: mean over seeds, band +/- 1 sd. Right:
    the summed attention on the rest of the prompt, where attention taken off the subject
    goes when it does not go to the relation."""
    subsets = [s for s in SUBSETS if (data["subset"] == s).any()]
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.95):
        figure = Figure(figsize=(15, 4.6), layout="constrained")
        subject_ax, relation_ax, rest_ax = figure.subplots(1, 3)
        relation_ax.sharey(subject_ax)
        data = data.assign(rest_mass=1 - data["subject_mass"] - data["relation_mass"])
        panels = [
            (subject_ax, "subject_max", f"Max attention on {PARTS['subject_max']}"),
            (relation_ax, "relation_max", f"Max attention on {PARTS['relation_max']}"),
            (rest_ax, "rest_mass", "Summed attention on the rest of the prompt"),
        ]
        for ax, column, title in panels:
            for subset in subsets:
                rows = data[data["subset"] == subset].groupby("layer")[column].agg(["mean", "std"]).reset_index()
                draw_mean_and_band(ax, rows["layer"], rows["mean"], rows["std"], subset, label=LABELS[subset])
            ax.set_xlabel("layer")
            ax.set_title(title)
            if data["layer"].max() <= 16:
                ax.set_xticks(sorted(data["layer"].unique()))
            ax.set_xlim(data["layer"].min() - 0.3, data["layer"].max() + 0.3)
            ax.set_ylim(bottom=0)
        subject_ax.set_ylabel("attention from the last prompt position\n(max over the part's tokens, mean over heads)")
        rest_ax.set_ylabel("summed over the other tokens (template,\nfirst token, punctuation), mean over heads")
        rest_ax.set_ylim(top=1)
        seeds = data.groupby("subset")["seed"].nunique().max()
        questions = int(data["questions"].max())
        band = f"mean over {seeds} seeds, bands: ± 1 sd" if seeds > 1 else "1 seed (no band)"
        figure.suptitle(f"{model} on {dataset}: where the finetuned model looks when it answers", fontweight="bold")
        figure.legend(
            handles=[Line2D([], [], label=LABELS[s], **STYLES[s]) for s in subsets],
            loc="outside lower center",
            ncol=len(subsets),
            frameon=False,
            title=f"{questions} held-out questions; {band}",
            title_fontsize="small",
        )
    return figure


def plot_attention_heatmaps(examples: Mapping[str, pd.DataFrame], model: str, dataset: str):
    """One question's attention from the last position (layers x prompt tokens,
    mean over heads), one panel per subset, on one colour scale; subject tokens in bold red."""
    first = next(iter(examples.values()))
    tokens = first[first["layer"] == first["layer"].min()].sort_values("position")
    layers = sorted(first["layer"].unique())  # a hybrid model's attention layers may skip numbers
    top = max(float(e["weight"].max()) for e in examples.values())
    # A square-root scale: the first token often soaks up most attention (an attention sink)
    # and would leave every other cell dark on a linear scale.
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=top)
    width = min(36.0, 2.0 + len(examples) * (1.0 + 0.24 * len(tokens)))
    height = 3.4 + 0.28 * len(layers)
    with sns.axes_style("white"):
        figure = Figure(figsize=(width, height), layout="constrained")
        axes = np.atleast_1d(figure.subplots(1, len(examples), sharey=True))
        for ax, (subset, example) in zip(axes, examples.items()):
            grid = example.pivot(index="layer", columns="position", values="weight").sort_index()
            image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="magma", norm=norm)
            ax.set_xticks(range(len(tokens)), list(tokens["token"]), rotation=90, fontsize=8)
            for label, part in zip(ax.get_xticklabels(), tokens["part"]):
                if part == "subject":
                    label.set_color("tab:red")
                    label.set_fontweight("bold")
            ticks = range(0, len(layers), 1 if len(layers) <= 16 else 4)
            ax.set_yticks(ticks, [layers[t] for t in ticks])
            ax.set_title(LABELS.get(subset, subset))
            ax.set_xlabel("prompt token")
        axes[0].set_ylabel("layer")
        figure.colorbar(image, ax=list(axes), label="attention weight\n(mean over heads)")
        figure.suptitle(
            f"{model} on {dataset}: {first['question'].iloc[0]}  (gold: {first['answer'].iloc[0]})",
            fontweight="bold",
        )
    return figure


def make_attention_figures(
    sources: Iterable[Mapping],
    examples: Mapping[str, str | Path],
    model: str,
    dataset: str,
    by_layer_paths: Iterable[str | Path],
    heatmap_paths: Iterable[str | Path],
) -> None:
    """Read the attention tables of one (model, dataset) and write both figures, each to
    every path of its list (png, pdf). `examples` maps a subset to its example table (one seed)."""
    data = read_attention(sources)
    tables = {}
    for subset, path in examples.items():
        if not Path(path).is_file():
            raise FactftError(f"attention example {path} is missing; run the `attention` rule for it")
        # Tokens are text: "NA" or "1990" must not turn into a missing value or a number.
        tables[subset] = read_tsv(path, "attention example", keep_default_na=False, dtype={"token": str})
    if not tables:
        raise FactftError(f"no attention example for model '{model}' on dataset '{dataset}' to plot")
    save_figure(plot_attention_by_layer(data, model, dataset), by_layer_paths)
    save_figure(plot_attention_heatmaps(tables, model, dataset), heatmap_paths)
