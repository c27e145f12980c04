"""Summaries over seeds of the metrics tables: the analog of the paper's results table, and the plotted data.

Each evaluation's scores make a long metrics table (factft.metrics: scope, x, n, accuracy,
exact_match, relation_guess: the share answered with the relation's commonest answer). A
*source* labels one such file: {model, dataset, subset, seed, path}, where subset is a
finetuning subset (top, bottom, random, whole, or a sized one such as top25:
factft.subsets; one table per seed) or a reference without seed: "base" (the pretrained
model answering zero-shot), "fewshot" (the same after k solved questions, evaluate.fewshot)
or "cloze" (the pretrained model completing the fact's statement: what it stores, as
opposed to what QA extracts). A finetuned run's source also names its per-question
`predictions`, from which come the gap's bootstrap interval over test subjects and the
accuracy per relation.
rules/common.smk builds the sources from the config.

`python -m factft.summary results/tables/summary.tsv` prints the summary for a reader.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from factft import subsets as subset_names
from factft.errors import FactftError
from factft.metrics import METRICS_COLUMNS, gold_metrics
from factft.tables import read_table, read_tsv, write_tsv

SUBSETS = subset_names.KINDS  # the paper's four: summary.tsv always has their columns
REFERENCES = ("base", "fewshot", "cloze")
LABELS = {
    **{name: subset_names.label(name) for name in SUBSETS},
    "base": "Base, zero-shot QA",
    "fewshot": "Base, few-shot QA",
    "cloze": "Base, cloze (stored facts)",
}
KEYS = ("model", "dataset", "subset", "seed")
GAP = "top_minus_bottom"
# Paired differences reported with their spread over seeds and interval over test subjects: the
# paper's gap, and its other finding as its abstract reads: the popular half matches the whole pool.
COMPARISONS = (("top", "bottom"), ("top", "whole"))
# Older metrics tables lack it; read as NaN rather than forcing the evaluations to rerun.
OPTIONAL_METRICS = ("relation_guess",)
FIGURE_NAME = "accuracy_vs_popularity"
TABLE_FORMATS = ("markdown", "latex")
_LATEX_SPECIAL = str.maketrans({**{c: "\\" + c for c in "&%$#_{}"}, "\\": r"\textbackslash{}"})
BY_RELATION = ("model", "dataset", "subset", "relation", "n", "mean", "sd", "guess_mean", "runs")


def collect_metrics(sources: Iterable[Mapping]) -> pd.DataFrame:
    """One long table of every source's metrics, keyed by model, dataset, subset and seed.

    seed is a nullable integer: missing for the base and cloze references.
    """
    tables = []
    for source in sources:
        subset = source["subset"]
        if not (subset in REFERENCES or subset_names.is_subset(subset)):
            raise ValueError(
                f"source {source['path']}: subset '{subset}' is neither a finetuning subset nor one of {REFERENCES}"
            )
        table = read_metrics(source["path"])
        for key in KEYS:
            table.insert(KEYS.index(key), key, source.get(key))
        tables.append(table)
    if not tables:
        raise FactftError(
            "no metrics tables to summarise: the config lists no model, dataset, subset or seed"
        )
    metrics = pd.concat(tables, ignore_index=True)
    metrics["seed"] = metrics["seed"].astype("Int64")
    return metrics


def read_metrics(path: str | Path) -> pd.DataFrame:
    """Read one metrics.tsv; a missing or malformed file is a FactftError naming it."""
    table = read_tsv(path, "metrics table")
    missing = [c for c in METRICS_COLUMNS if c not in table.columns and c not in OPTIONAL_METRICS]
    if missing:
        raise FactftError(
            f"metrics table {path} lacks columns {missing}; has {list(table.columns)}. "
            f"Remake it: snakemake all --cores 1 --forcerun {path}"
        )
    if not (table["scope"] == "all").any():
        raise FactftError(
            f"metrics table {path} has no scope 'all' row; remake it: snakemake all --cores 1 --forcerun {path}"
        )
    return table.reindex(columns=list(METRICS_COLUMNS))


def summary_table(
    metrics: pd.DataFrame,
    gold_guess: Mapping[str, float] | None = None,
    intervals: Mapping[tuple[str, str, str], tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """One row per (model, dataset): overall held-out accuracy over seeds, references, the gap.

    Columns: model, dataset, n_test (held-out facts), n_seeds, <subset>_mean and <subset>_sd
    for the paper's four subsets (NaN where the config leaves one out) and every sized subset
    the metrics have (top25, ...), base, fewshot, cloze (NaN without their tables), and
    top_minus_bottom_mean/_sd/_seeds: FT-Top minus FT-Bottom
    paired by seed (the runs of one seed share the adapter initialisation and the
    training seed, so the paired difference removes the variation they share). sd is the sample
    standard deviation over seeds (NaN for one seed). top_minus_bottom_ci_low/_high: the
    gap's interval from `intervals` ((model, dataset, "top_minus_bottom") -> (low, high), see
    gap_interval). The same five for top_minus_whole (COMPARISONS).
    Then <subset>_guess: the share of questions answered with the relation's commonest answer
    (factft.metrics.relation_guess), mean over seeds, and gold_guess: that share for the gold
    answers, from `gold_guess` (dataset -> share). Missing entries give NaN.
    """
    overall = metrics[metrics["scope"] == "all"]
    finetuned = overall["subset"].map(subset_names.is_subset)
    subsets = subset_names.ordered([*SUBSETS, *overall.loc[finetuned, "subset"]])
    rows = []
    for (model, dataset), group in overall.groupby(["model", "dataset"], sort=False):
        runs = group[finetuned[group.index]]
        row = {
            "model": model,
            "dataset": dataset,
            "n_test": int(group["n"].max()),
            "n_seeds": int(runs["seed"].nunique()),
        }
        by_seed = runs.pivot_table(index="seed", columns="subset", values="accuracy", aggfunc="first")
        for subset in subsets:
            values = by_seed[subset].dropna() if subset in by_seed else pd.Series(dtype="float64")
            row[f"{subset}_mean"] = values.mean()
            row[f"{subset}_sd"] = values.std(ddof=1)
        for reference in REFERENCES:
            values = group.loc[group["subset"] == reference, "accuracy"]
            row[reference] = values.iloc[0] if len(values) else math.nan
        for first, second in COMPARISONS:
            name = comparison(first, second)
            gap = _paired_gap(by_seed, first, second)
            row[f"{name}_mean"] = gap.mean()
            row[f"{name}_sd"] = gap.std(ddof=1)
            row[f"{name}_seeds"] = len(gap)
            interval = (intervals or {}).get((model, dataset, name), (math.nan, math.nan))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"] = interval
        for subset in subsets:
            row[f"{subset}_guess"] = runs.loc[runs["subset"] == subset, "relation_guess"].mean()
        row["gold_guess"] = (gold_guess or {}).get(dataset, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def comparison(first: str, second: str) -> str:
    """The summary's name for `first` minus `second`: top_minus_bottom."""
    return f"{first}_minus_{second}"


def _paired_gap(by_seed: pd.DataFrame, first: str, second: str) -> pd.Series:
    """`first` minus `second` for each seed that has both."""
    if first not in by_seed or second not in by_seed:
        return pd.Series(dtype="float64")
    return (by_seed[first] - by_seed[second]).dropna()


def predictions_by_experiment(sources: Iterable[Mapping]) -> Iterator[tuple[tuple[str, str], dict]]:
    """Per (model, dataset), the finetuned runs' predictions as {(subset, seed): table}.

    One experiment's tables are in memory at a time; sources without predictions are left out.
    """
    paths: dict[tuple[str, str], dict] = {}
    for source in sources:
        if subset_names.is_subset(source["subset"]) and source.get("predictions"):
            runs = paths.setdefault((source["model"], source["dataset"]), {})
            runs[(source["subset"], source["seed"])] = source["predictions"]
    for experiment, runs in paths.items():
        yield experiment, {run: read_table(path) for run, path in runs.items()}


def gap_interval(
    runs: Mapping[tuple[str, int], pd.DataFrame], first: str = "top", second: str = "bottom"
) -> tuple[float, float]:
    """gap_confidence_interval over every seed of `runs` with both `first` and `second`."""
    pairs = [
        (table, runs[(second, seed)])
        for (subset, seed), table in runs.items()
        if subset == first and (second, seed) in runs
    ]
    return gap_confidence_interval(pairs)


def accuracy_by_relation(model: str, dataset: str, runs: Mapping[tuple[str, int], pd.DataFrame]) -> pd.DataFrame:
    """Per subset and relation: n (test facts), accuracy mean and sd over seeds, guess_mean
    (the share answered with the relation's commonest answer) and runs (seeds); for checking
    that one relation does not carry the gap, and which relations a subset guesses on.
    """
    rows = []
    for (subset, seed), table in runs.items():
        guess = table["relation_guess"] if "relation_guess" in table.columns else math.nan
        per_relation = (
            table.assign(correct=table["correct"].astype("float64"), guess=guess)
            .groupby("relation", sort=True)
            .agg(n=("correct", "size"), accuracy=("correct", "mean"), relation_guess=("guess", "mean"))
            .reset_index()
        )
        rows.append(per_relation.assign(subset=subset, seed=seed))
    if not rows:
        return pd.DataFrame(columns=BY_RELATION)
    table = _over_runs(pd.concat(rows, ignore_index=True), ["subset", "relation"])
    table["_order"] = table["subset"].map(_reading_order(table["subset"]))
    table = table.sort_values(["_order", "relation"], kind="stable").drop(columns="_order")
    return table.assign(model=model, dataset=dataset)[list(BY_RELATION)].reset_index(drop=True)


def _paired_questions(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """Per question of one seed, by id: its subject and `difference`, the first subset's
    correctness minus the second's (FT-Top's minus FT-Bottom's), aligned by id."""
    joined = first.set_index("id")[["subject", "correct"]].join(
        second.set_index("id")["correct"].rename("second"), how="inner"
    ).sort_index()  # every seed's questions in one order
    if len(joined) != len(first) or len(joined) != len(second):
        raise FactftError(
            f"the predictions of two subsets compared (FT-Top and FT-Bottom, or FT-Whole) cover different "
            f"test questions ({len(first)} and {len(second)} rows, {len(joined)} shared ids); remake them "
            "from the same split"
        )
    difference = joined["correct"].astype("float64") - joined["second"].astype("float64")
    return pd.DataFrame({"subject": joined["subject"], "difference": difference})


def gap_confidence_interval(
    pairs: list[tuple[pd.DataFrame, pd.DataFrame]],
    *,
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of FT-Top minus FT-Bottom accuracy (or of another pair of
    subsets) over test subjects.

    `pairs` holds (top, bottom) predictions of each seed that has both. The split holds out
    whole subjects, and one subject's questions rise and fall together (whether pretraining
    stored its facts moves them all), so subjects are drawn with replacement, each with all its
    questions: drawing questions as if independent gives too narrow an interval. The same draw
    scores both subsets of every seed (paired), so the interval says how much the gap depends
    on which subjects were asked, given the trained models; the spread over seeds is reported
    beside it, not inside it (three seeds are too few to resample). (NaN, NaN) without pairs.
    """
    if not pairs:
        return float("nan"), float("nan")
    seeds = [_paired_questions(top, bottom) for top, bottom in pairs]
    if any(not questions.index.equals(seeds[0].index) for questions in seeds):
        raise FactftError("the seeds' predictions cover different test questions; remake them from the same split")
    per_question = seeds[0].assign(difference=np.mean([q["difference"] for q in seeds], axis=0))
    by_subject = per_question.groupby("subject", dropna=False)["difference"].agg(["sum", "size"])
    sums, sizes = by_subject["sum"].to_numpy(), by_subject["size"].to_numpy()
    n = len(sums)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Draw in chunks: draws x n indices at once would not fit for many subjects.
    chunk = max(1, min(draws, 2_000_000 // n))
    means = []
    for start in range(0, draws, chunk):
        drawn = rng.integers(0, n, size=(min(chunk, draws - start), n))
        means.append(sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return float(low), float(high)


def gold_guess(test: pd.DataFrame) -> float:
    """The share of a test split's gold answers that are their relation's commonest."""
    table = gold_metrics(test, percentiles=())
    return float(table.loc[table["scope"] == "all", "relation_guess"].iloc[0])


def accuracy_by_percentile(metrics: pd.DataFrame) -> pd.DataFrame:
    """The plotted data: accuracy per (model, dataset, subset, scope, x), mean and sd over seeds.

    scope "top" (x = the top-x% most popular test facts) and "decile" (x = 10..100, 100 =
    the most popular tenth); n is the number of test facts in the bin, runs the number of
    metrics tables averaged (seeds; 1 for base and cloze). Empty bins have NaN accuracy
    and 0 runs.
    guess_mean and guess_sd: the same for the share answered with the relation's commonest
    answer (factft.metrics.relation_guess).
    """
    binned = metrics[metrics["scope"].isin(["top", "decile"])]
    table = _over_runs(binned, ["model", "dataset", "subset", "scope", "x"])
    table["_order"] = table["subset"].map(_reading_order(table["subset"]))
    table = table.sort_values(["model", "dataset", "_order", "scope", "x"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def _reading_order(names: Iterable[str]) -> dict[str, int]:
    """Position of each name: finetuning subsets in factft.subsets' order, then the references."""
    names = set(names)
    finetuned = subset_names.ordered(n for n in names if n not in REFERENCES)
    return {name: i for i, name in enumerate([*finetuned, *REFERENCES])}


def label(name: str) -> str:
    """How figures and printed summaries name a subset or reference."""
    return LABELS.get(name) or subset_names.label(name)


def _over_runs(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per `keys`, over runs (seeds): n (test facts), accuracy mean and sd, runs, and the
    relation_guess share's mean and sd."""
    return (
        rows.groupby(keys, sort=False)
        .agg(
            n=("n", "max"),
            mean=("accuracy", "mean"),
            sd=("accuracy", lambda a: a.std(ddof=1)),
            runs=("accuracy", "count"),  # an empty bin has no accuracy: 0 runs
            guess_mean=("relation_guess", "mean"),
            guess_sd=("relation_guess", lambda a: a.std(ddof=1)),
        )
        .reset_index()
    )


def make_summary(
    sources: Iterable[Mapping],
    tests: Mapping[str, str | Path],
    summary_path: str | Path,
    by_percentile_path: str | Path,
    by_relation_path: str | Path,
) -> None:
    """Read every source and write summary.tsv, accuracy_by_percentile.tsv and
    accuracy_by_relation.tsv. `tests` maps each dataset to its test split (for the gold
    answers' guess rate).
    """
    sources = list(sources)
    metrics = collect_metrics(sources)
    gold = {dataset: gold_guess(read_table(path)) for dataset, path in tests.items()}
    intervals, by_relation = {}, []
    for (model, dataset), runs in predictions_by_experiment(sources):
        for first, second in COMPARISONS:
            intervals[(model, dataset, comparison(first, second))] = gap_interval(runs, first, second)
        by_relation.append(accuracy_by_relation(model, dataset, runs))
    write_tsv(summary_table(metrics, gold, intervals), summary_path)
    write_tsv(accuracy_by_percentile(metrics), by_percentile_path)
    by_relation = pd.concat(by_relation, ignore_index=True) if by_relation else pd.DataFrame(columns=BY_RELATION)
    write_tsv(by_relation, by_relation_path)


def read_summary(path: str | Path) -> pd.DataFrame:
    """summary.tsv as make_summary wrote it: a model or dataset named like a number ("007",
    "1e3") or a missing value ("NA") keeps the config's name."""
    return read_tsv(path, "summary table", dtype={"model": str, "dataset": str}, keep_default_na=False, na_values=[""])


def format_summary(summary: pd.DataFrame, figures_dir: str | Path | None = None) -> str:
    """A compact text summary of summary.tsv, with each experiment's figure path."""
    lines = []
    subsets = _summary_subsets(summary)
    width = max(len(label(name)) for name in [*subsets, *REFERENCES])
    for _, row in summary.iterrows():
        seeds = int(row["n_seeds"])
        lines.append(
            f"{row['model']} on {row['dataset']}: held-out accuracy on {int(row['n_test'])} test facts "
            f"(mean +/- sd over {seeds} seed{'s' * (seeds != 1)})"
        )
        for subset in subsets:
            mean = row.get(f"{subset}_mean", math.nan)
            if not pd.isna(mean):
                lines.append(f"  {label(subset):<{width}}  {mean:.3f} +/- {_sd(row[f'{subset}_sd'], 3)}")
        for reference in REFERENCES:
            if not pd.isna(row.get(reference, math.nan)):
                lines.append(f"  {label(reference):<{width}}  {row[reference]:.3f}")
        for first, second in COMPARISONS:
            name, text = comparison(first, second), f"{label(first)} - {label(second)}"
            seeds = int(row.get(f"{name}_seeds", 0))  # a summary.tsv from before top_minus_whole: 0
            if seeds:
                interval = ""
                if not pd.isna(row.get(f"{name}_ci_low", math.nan)):
                    interval = f"; 95% CI over test subjects {row[f'{name}_ci_low']:+.2f} to {row[f'{name}_ci_high']:+.2f}"
                lines.append(
                    f"  {text} = {row[f'{name}_mean']:+.2f} "
                    f"(sd {_sd(row[f'{name}_sd'], 2)} over {seeds} seed{'s' * (seeds != 1)}{interval})"
                )
            elif name == GAP:  # the paper's gap is missed; the other comparison is optional
                lines.append(f"  {text}: not available (needs subsets {first} and {second})")
        guesses = [
            f"{label(subset)} {row[f'{subset}_guess']:.2f}"
            for subset in subsets
            if not pd.isna(row.get(f"{subset}_guess", math.nan))
        ]
        if guesses:
            gold = row.get("gold_guess", math.nan)
            lines.append(
                "  answered with the relation's commonest answer: "
                + ", ".join(guesses)
                + ("" if pd.isna(gold) else f" (gold answers {gold:.2f})")
            )
        if figures_dir is not None:
            figure = Path(figures_dir) / str(row["model"]) / str(row["dataset"]) / f"{FIGURE_NAME}.png"
            lines.append(f"  figure: {figure}{'' if figure.exists() else ' (not made yet)'}")
        lines.append("")
    return "\n".join(lines)


def paper_table(summary: pd.DataFrame, fmt: str) -> str:
    """The paper's results table from summary.tsv, for a paper or a lab note: held-out accuracy in %
    (mean +/- sd over seeds) per subset the summary has, FT-Top - FT-Bottom, and FT-Top - FT-Whole
    where the summary has it, one row per (model, dataset). fmt: "markdown" or "latex" (booktabs;
    model and dataset names escaped).
    """
    if fmt not in TABLE_FORMATS:
        raise FactftError(f"table format '{fmt}': unknown; formats are {', '.join(TABLE_FORMATS)}")
    latex = fmt == "latex"
    subsets = [s for s in _summary_subsets(summary) if summary[f"{s}_mean"].notna().any()]
    whole = comparison("top", "whole")
    gaps = [GAP] + ([whole] if f"{whole}_mean" in summary and summary[f"{whole}_mean"].notna().any() else [])
    header = [
        "Model",
        "Dataset",
        *(label(s).replace("%", r"\%") if latex else label(s) for s in subsets),
        *(name.replace("_minus_", " $-$ " if latex else " - ").title() for name in gaps),
    ]
    rows = []
    for _, row in summary.iterrows():
        names = [str(row["model"]), str(row["dataset"])]
        cells = [name.translate(_LATEX_SPECIAL) if latex else name for name in names]
        for name in [*subsets, *gaps]:
            mean, sd = row[f"{name}_mean"], row[f"{name}_sd"]
            cell = "n/a" if pd.isna(mean) else f"{100 * mean:{'+' if name in gaps else ''}.1f}"
            if not (pd.isna(mean) or pd.isna(sd)):
                cell += f" $\\pm$ {100 * sd:.1f}" if latex else f" ± {100 * sd:.1f}"
            cells.append(cell)
        rows.append(cells)
    if not latex:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"
    lines = [r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule", " & ".join(header) + r" \\"]
    lines += [r"\midrule", *(" & ".join(cells) + r" \\" for cells in rows), r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _summary_subsets(summary: pd.DataFrame) -> list[str]:
    """The finetuning subsets a summary table has columns for, in reading order."""
    names = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
    return subset_names.ordered(n for n in names if subset_names.is_subset(n))


def _sd(value: float, digits: int) -> str:
    return "n/a" if pd.isna(value) else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factft.summary", description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="results/tables/summary.tsv (the summary rule's output)")
    parser.add_argument(
        "--figures",
        type=Path,
        default=None,
        help="figures folder (default: results/figures beside the tables folder)",
    )
    parser.add_argument(
        "--table",
        choices=TABLE_FORMATS,
        help="print only the paper's results table (accuracy in %%, mean +/- sd over seeds) in this format",
    )
    args = parser.parse_args(argv)
    if not args.summary.exists():
        print(
            f"factft: {args.summary} does not exist; make it with: snakemake --cores 2 {args.summary}",
            file=sys.stderr,
        )
        return 1
    summary = read_summary(args.summary)
    if args.table:
        print(paper_table(summary, args.table), end="")
        return 0
    results = args.summary.parent.parent
    figures = args.figures or results / "figures"
    print(format_summary(summary, figures), end="")
    overview = figures / "overview.png"
    print(f"the whole grid at a glance: {overview}{'' if overview.exists() else ' (not made yet)'}")
    report = results / "report.html"
    if report.exists():
        print(f"HTML report (every figure with its caption): {report}")
    else:
        print(f"HTML report: snakemake [--configfile ...] --report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
