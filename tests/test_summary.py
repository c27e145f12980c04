import math

import numpy as np
import pandas as pd
import pytest

from factft.errors import FactftError
from factft.metrics import metrics_table, relation_guess
from factft.summary import (
    accuracy_by_percentile,
    accuracy_by_relation,
    collect_metrics,
    format_summary,
    gap_confidence_interval,
    gap_interval,
    main,
    make_summary,
    paper_table,
    read_summary,
    summary_table,
)
from factft.tables import write_table, write_tsv

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def run_predictions(correct):
    """A predictions table (factft.metrics) for one prediction per test fact: a correct fact
    answers its own gold "a<i>", every wrong one the same stock answer "London"; one
    relation. Fact i has popularity_pct 10 * (i + 1): the last fact is the most popular.
    """
    n = len(correct)
    answers = [f"a{i}" if ok else "london" for i, ok in enumerate(correct)]
    return pd.DataFrame(
        {
            "id": [f"f{i}" for i in range(n)],
            "subject": [f"s{i}" for i in range(n)],
            "prediction": answers,
            "correct": correct,
            "exact_match": correct,
            "relation_guess": relation_guess(answers, ["born_in"] * n),
            "popularity_pct": [100 * (i + 1) / n for i in range(n)],
            "relation": "born_in",
        }
    )


def write_metrics(path, correct):
    """A real metrics.tsv (factft.metrics.metrics_table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tsv(metrics_table(run_predictions(correct), PERCENTILES), path)
    return str(path)


def write_predictions(path, correct):
    write_table(run_predictions(correct), path)
    return str(path)


def write_test(path, n=10):
    """A test split where two facts share the gold answer "lyon", the others' all differ:
    gold guess rate 2 / n (an answer given once is no guess)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    test = pd.DataFrame(
        {
            "answers": [["lyon", "alias"]] * 2 + [[f"a{i}", "alias"] for i in range(2, n)],
            "relation": "born_in",
            "popularity_pct": [100 * (i + 1) / n for i in range(n)],
        }
    )
    write_table(test, path)
    return str(path)


def hits(k, n=10):
    """k correct answers out of n, on the most popular facts."""
    return [False] * (n - k) + [True] * k


def make_sources(root, accuracy, base=1, cloze=5, model="tiny", dataset="synth", fewshot=None):
    """Sources like rules/common.smk builds them; accuracy: {subset: {seed: correct out of 10}}."""
    sources = []
    for subset, by_seed in accuracy.items():
        for seed, k in by_seed.items():
            run = root / model / dataset / subset / f"seed{seed}"
            path = write_metrics(run / "metrics.tsv", hits(k))
            predictions = write_predictions(run / "predictions.parquet", hits(k))
            sources.append(
                dict(model=model, dataset=dataset, subset=subset, seed=seed, path=path, predictions=predictions)
            )
    for subset, k in (("base", base), ("fewshot", fewshot), ("cloze", cloze)):
        if k is not None:
            path = write_metrics(root / model / dataset / subset / "metrics.tsv", hits(k))
            sources.append(dict(model=model, dataset=dataset, subset=subset, seed=None, path=path))
    return sources


GRID = {
    "top": {0: 6, 1: 7, 2: 9},
    "bottom": {0: 4, 1: 3, 2: 6},
    "random": {0: 5, 1: 5, 2: 5},
    "whole": {0: 8, 1: 6, 2: 7},
}


def test_summary_has_mean_and_sd_over_seeds_base_cloze_and_test_size(tmp_path):
    row = summary_table(collect_metrics(make_sources(tmp_path, GRID))).iloc[0]
    assert (row["model"], row["dataset"], row["n_test"], row["n_seeds"]) == ("tiny", "synth", 10, 3)
    assert row["top_mean"] == pytest.approx(22 / 30)
    assert row["top_sd"] == pytest.approx(math.sqrt(((0.6 - 22 / 30) ** 2 + (0.7 - 22 / 30) ** 2 + (0.9 - 22 / 30) ** 2) / 2))
    assert row["bottom_mean"] == pytest.approx(13 / 30)
    assert row["random_mean"] == pytest.approx(0.5)
    assert row["random_sd"] == pytest.approx(0.0)
    assert row["whole_mean"] == pytest.approx(0.7)
    assert row["whole_sd"] == pytest.approx(0.1)
    assert row["base"] == pytest.approx(0.1)
    assert row["cloze"] == pytest.approx(0.5)


def test_the_few_shot_reference_is_a_column_and_a_printed_line_only_when_configured(tmp_path):
    without = summary_table(collect_metrics(make_sources(tmp_path / "a", GRID)))
    assert math.isnan(without.iloc[0]["fewshot"]) and "few-shot" not in format_summary(without)
    summary = summary_table(collect_metrics(make_sources(tmp_path / "b", GRID, fewshot=3)))
    assert summary.iloc[0]["fewshot"] == pytest.approx(0.3)
    assert list(summary.columns).index("fewshot") == list(summary.columns).index("base") + 1
    assert "Base, few-shot QA           0.300" in format_summary(summary)


def test_top_minus_bottom_gap_is_paired_by_seed_not_by_position(tmp_path):
    # Per seed: 0.6-0.4, 0.7-0.3, 0.9-0.6 = 0.2, 0.4, 0.3. Listing bottom's seeds in another
    # order must not change the pairing.
    sources = make_sources(tmp_path, GRID)
    bottom = [s for s in sources if s["subset"] == "bottom"]
    shuffled = [s for s in sources if s["subset"] != "bottom"] + bottom[::-1]
    row = summary_table(collect_metrics(shuffled)).iloc[0]
    assert row["top_minus_bottom_mean"] == pytest.approx(0.3)
    assert row["top_minus_bottom_sd"] == pytest.approx(0.1)
    assert row["top_minus_bottom_seeds"] == 3


def test_top_minus_whole_is_paired_by_seed_with_its_interval_over_test_subjects(tmp_path):
    """The paper's second claim: the popular half matches finetuning on the whole pool."""
    sources = make_sources(tmp_path, GRID)
    make_summary(sources, {}, tmp_path / "s.tsv", tmp_path / "p.tsv", tmp_path / "r.tsv")
    row = read_summary(tmp_path / "s.tsv").iloc[0]
    # Per seed: 0.6-0.8, 0.7-0.6, 0.9-0.7.
    assert row["top_minus_whole_mean"] == pytest.approx(0.1 / 3, abs=1e-6)  # the tsv's 6 digits
    assert row["top_minus_whole_sd"] == pytest.approx(np.std([-0.2, 0.1, 0.2], ddof=1), abs=1e-6)
    assert row["top_minus_whole_seeds"] == 3
    # The seeds' questions: FT-Top right on the 6, 7, 9 most popular, FT-Whole on the 8, 6, 7.
    runs = {(s["subset"], s["seed"]): pd.read_parquet(s["predictions"]) for s in sources if s["seed"] is not None}
    interval = (row["top_minus_whole_ci_low"], row["top_minus_whole_ci_high"])
    assert interval == pytest.approx(gap_interval(runs, "top", "whole"), abs=1e-6)
    assert row["top_minus_whole_ci_low"] < row["top_minus_whole_mean"] < row["top_minus_whole_ci_high"]
    text = format_summary(read_summary(tmp_path / "s.tsv"))
    assert "FT-Top - FT-Whole = +0.03 (sd 0.21 over 3 seeds; 95% CI over test subjects" in text
    without_whole = summary_table(collect_metrics(make_sources(tmp_path / "b", {"top": {0: 6}, "bottom": {0: 4}})))
    assert without_whole.iloc[0]["top_minus_whole_seeds"] == 0
    assert "FT-Whole" not in format_summary(without_whole)


def test_gap_uses_only_seeds_that_have_both_top_and_bottom(tmp_path):
    grid = {"top": {0: 6, 1: 7, 2: 9}, "bottom": {0: 4, 1: 3}}
    row = summary_table(collect_metrics(make_sources(tmp_path, grid))).iloc[0]
    assert row["top_minus_bottom_mean"] == pytest.approx(0.3)  # (0.2 + 0.4) / 2
    assert row["top_minus_bottom_sd"] == pytest.approx(math.sqrt(0.02))
    assert row["top_minus_bottom_seeds"] == 2
    assert row["top_mean"] == pytest.approx(22 / 30)  # FT-Top itself keeps all three seeds


def test_config_without_random_and_whole_still_summarises_and_prints(tmp_path):
    grid = {"top": GRID["top"], "bottom": GRID["bottom"]}
    summary = summary_table(collect_metrics(make_sources(tmp_path, grid, cloze=None)))
    row = summary.iloc[0]
    assert math.isnan(row["random_mean"]) and math.isnan(row["whole_mean"]) and math.isnan(row["cloze"])
    text = format_summary(summary)
    assert "FT-Top " in text and "FT-Bottom " in text
    assert "FT-Random" not in text and "FT-Whole" not in text and "cloze" not in text


def test_without_bottom_the_gap_is_reported_as_unavailable(tmp_path):
    summary = summary_table(collect_metrics(make_sources(tmp_path, {"top": GRID["top"]})))
    assert summary.iloc[0]["top_minus_bottom_seeds"] == 0
    assert math.isnan(summary.iloc[0]["top_minus_bottom_mean"])
    assert "FT-Top - FT-Bottom: not available (needs subsets top and bottom)" in format_summary(summary)


def test_one_seed_gives_no_sd(tmp_path):
    summary = summary_table(collect_metrics(make_sources(tmp_path, {"top": {0: 6}, "bottom": {0: 4}})))
    assert math.isnan(summary.iloc[0]["top_sd"])
    assert "FT-Top - FT-Bottom = +0.20 (sd n/a over 1 seed)" in format_summary(summary)


def test_summary_has_one_row_per_model_and_dataset_in_grid_order(tmp_path):
    sources = make_sources(tmp_path, GRID, model="m1", dataset="d1") + make_sources(
        tmp_path, {"top": {0: 2}, "bottom": {0: 1}}, model="m0", dataset="d0"
    )
    summary = summary_table(collect_metrics(sources))
    assert list(zip(summary["model"], summary["dataset"])) == [("m1", "d1"), ("m0", "d0")]
    assert summary.iloc[1]["top_minus_bottom_mean"] == pytest.approx(0.1)


def test_accuracy_by_percentile_averages_each_bin_over_seeds(tmp_path):
    table = accuracy_by_percentile(collect_metrics(make_sources(tmp_path, GRID)))
    top = table[(table["subset"] == "top") & (table["scope"] == "top")].set_index("x")
    # Every seed of FT-Top gets the 6 most popular facts right: the top 60% is all correct.
    assert top.loc[60, "mean"] == pytest.approx(1.0) and top.loc[60, "sd"] == pytest.approx(0.0)
    # Top 80% (8 facts): 6, 7 and 8 correct.
    assert top.loc[80, "mean"] == pytest.approx((6 + 7 + 8) / 24)
    assert top.loc[80, "n"] == 8 and top.loc[80, "runs"] == 3
    decile = table[(table["subset"] == "bottom") & (table["scope"] == "decile")].set_index("x")
    # FT-Bottom's seeds get the 4, 3 and 6 most popular facts right. Decile 60 holds the
    # fifth most popular fact (right for seed 2 only), decile 70 the fourth (seeds 0 and 2).
    assert decile.loc[60, "mean"] == pytest.approx(1 / 3)
    assert decile.loc[70, "mean"] == pytest.approx(2 / 3)
    # A miss is a guess here (every wrong answer is "London"): decile 60 is a miss for two seeds.
    assert decile.loc[60, "guess_mean"] == pytest.approx(2 / 3)
    base = table[(table["subset"] == "base") & (table["scope"] == "top")]
    assert (base["runs"] == 1).all() and base["sd"].isna().all()
    assert list(table["subset"].unique()) == ["top", "bottom", "random", "whole", "base", "cloze"]
    # A bin without test facts (fewer facts than bins) has no accuracy in any seed.
    empty = collect_metrics(make_sources(tmp_path, GRID)).assign(n=0, accuracy=float("nan"))
    assert (accuracy_by_percentile(empty)["runs"] == 0).all()


def test_make_summary_writes_both_tables_and_the_cli_prints_the_gap_and_figure(tmp_path, capsys):
    results = tmp_path / "results"
    sources = make_sources(results, GRID)
    tests = {"synth": write_test(results / "synth" / "splits" / "test.parquet")}
    tables = results / "tables"
    make_summary(sources, tests, tables / "summary.tsv", tables / "accuracy_by_percentile.tsv", tables / "by_relation.tsv")
    assert pd.read_csv(results / "tables" / "accuracy_by_percentile.tsv", sep="\t")["x"].max() == 100
    assert main([str(results / "tables" / "summary.tsv")]) == 0
    out = capsys.readouterr().out
    assert "tiny on synth: held-out accuracy on 10 test facts (mean +/- sd over 3 seeds)" in out
    assert "FT-Whole" in out and "0.700 +/- 0.100" in out
    assert "FT-Top - FT-Bottom = +0.30 (sd 0.10 over 3 seeds; 95% CI over test subjects +0." in out
    assert "answered with the relation's commonest answer: FT-Top 0.23, FT-Bottom 0.57" in out
    assert "(gold answers 0.20)" in out
    figure = results / "figures" / "tiny" / "synth" / "accuracy_vs_popularity.png"
    assert f"figure: {figure} (not made yet)" in out
    assert f"the whole grid at a glance: {results / 'figures' / 'overview.png'} (not made yet)" in out


def test_names_that_read_as_numbers_or_missing_values_stay_the_configs_names(tmp_path):
    results = tmp_path / "results"
    sources = make_sources(results, GRID, model="1e3", dataset="NA")
    make_summary(sources, {}, tmp_path / "summary.tsv", tmp_path / "p.tsv", tmp_path / "r.tsv")
    summary = read_summary(tmp_path / "summary.tsv")
    assert (summary.loc[0, "model"], summary.loc[0, "dataset"]) == ("1e3", "NA")
    assert summary.loc[0, "top_mean"] == pytest.approx(22 / 30)
    assert "| 1e3 | NA | 73.3" in paper_table(summary, "markdown")


def test_a_malformed_metrics_table_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "metrics.tsv"
    bad.write_text("scope\tx\tacc\nall\t100\t0.5\n")
    with pytest.raises(FactftError, match=rf"{bad}.*lacks columns \['n', 'accuracy', 'exact_match'\]"):
        collect_metrics([dict(model="m", dataset="d", subset="top", seed=0, path=str(bad))])


def test_a_missing_metrics_table_is_an_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "metrics.tsv"
    with pytest.raises(FactftError, match=f"cannot read metrics table {missing}"):
        collect_metrics([dict(model="m", dataset="d", subset="top", seed=0, path=str(missing))])


def test_guess_rates_are_means_over_seeds_with_the_gold_answers_as_reference(tmp_path):
    # Wrong answers are all "London": FT-Top's seeds miss 4, 3, 1 of 10 (rates 0.4, 0.3 and
    # 0: "London" once is no collapse), FT-Bottom's 6, 7, 4.
    row = summary_table(collect_metrics(make_sources(tmp_path, GRID)), {"synth": 0.1}).iloc[0]
    assert row["top_guess"] == pytest.approx(0.7 / 3)
    assert row["bottom_guess"] == pytest.approx(1.7 / 3)
    assert row["random_guess"] == pytest.approx(0.5)
    assert row["gold_guess"] == pytest.approx(0.1)


def test_gold_guess_is_read_from_each_datasets_test_split(tmp_path):
    sources = make_sources(tmp_path, GRID)
    tests = {"synth": write_test(tmp_path / "test.parquet")}
    make_summary(sources, tests, tmp_path / "s.tsv", tmp_path / "p.tsv", tmp_path / "r.tsv")
    summary = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert summary.iloc[0]["gold_guess"] == pytest.approx(0.2)
    # The interval sits beside the gap it qualifies.
    columns = list(summary.columns)
    assert columns[columns.index("top_minus_bottom_seeds") + 1 :][:2] == [
        "top_minus_bottom_ci_low",
        "top_minus_bottom_ci_high",
    ]


def test_results_of_an_older_workflow_still_summarise_with_nan_where_data_is_missing(tmp_path):
    # Metrics tables without relation_guess and runs without predictions: accuracy as before.
    sources = [dict(s, predictions=None) for s in make_sources(tmp_path, GRID)]
    for source in sources:
        table = pd.read_csv(source["path"], sep="\t")
        table.drop(columns="relation_guess").to_csv(source["path"], sep="\t", index=False)
    make_summary(sources, {}, tmp_path / "summary.tsv", tmp_path / "by_percentile.tsv", tmp_path / "r.tsv")
    row = pd.read_csv(tmp_path / "summary.tsv", sep="\t").iloc[0]
    assert row["top_mean"] == pytest.approx(22 / 30)
    assert math.isnan(row["top_guess"]) and math.isnan(row["gold_guess"])
    assert math.isnan(row["top_minus_bottom_ci_low"])


def correct_table(correct, ids=None, subjects=None):
    """Predictions of `correct`; each question its own subject unless `subjects` are given."""
    ids = ids if ids is not None else [f"q{i}" for i in range(len(correct))]
    return pd.DataFrame({"id": ids, "subject": subjects if subjects is not None else ids, "correct": correct})


def test_gap_interval_is_a_point_when_every_question_agrees():
    n = 50
    same = (correct_table([True] * n), correct_table([True] * n))
    assert gap_confidence_interval([same]) == (0.0, 0.0)
    apart = (correct_table([True] * n), correct_table([False] * n))
    assert gap_confidence_interval([apart, apart]) == (1.0, 1.0)


def test_gap_interval_brackets_the_gap_with_the_width_of_the_normal_approximation():
    rng = np.random.default_rng(1)
    n = 4000
    top = correct_table(rng.random(n) < 0.45)
    bottom = correct_table(rng.random(n) < 0.35)
    low, high = gap_confidence_interval([(top, bottom)])
    difference = top["correct"].astype(float) - bottom["correct"].astype(float)
    gap, standard_error = difference.mean(), difference.std() / np.sqrt(n)
    assert low < gap < high
    assert (high - low) == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert gap_confidence_interval([(top, bottom)]) == (low, high)  # seeded: the same draws


def test_gap_interval_draws_subjects_with_all_their_questions():
    # 40 held-out subjects of 10 questions each: FT-Top alone right on all of a subject's
    # questions, or FT-Bottom alone, or neither (the subject's facts stored or not move them
    # together). The interval is that of 40 subject means, not of 400 independent questions.
    rng = np.random.default_rng(4)
    subjects, size = 40, 10
    per_subject = rng.choice([1.0, -1.0, 0.0], size=subjects, p=[0.4, 0.2, 0.4])
    difference = np.repeat(per_subject, size)
    names = np.repeat([f"s{i}" for i in range(subjects)], size)
    top, bottom = correct_table(difference > 0, subjects=names), correct_table(difference < 0, subjects=names)
    low, high = gap_confidence_interval([(top, bottom)])
    standard_error = per_subject.std() / np.sqrt(subjects)
    assert low < difference.mean() < high
    assert (high - low) == pytest.approx(2 * 1.96 * standard_error, rel=0.15)
    # Drawn question by question, the interval would be sqrt(10) times narrower.
    as_questions = correct_table(difference > 0), correct_table(difference < 0)
    low_q, high_q = gap_confidence_interval([as_questions])
    assert (high - low) > 2.5 * (high_q - low_q)


def test_gap_interval_pairs_questions_by_id_not_by_row_order():
    rng = np.random.default_rng(2)
    top = correct_table(rng.random(300) < 0.5)
    bottom = correct_table(rng.random(300) < 0.4)
    shuffled = bottom.sample(frac=1.0, random_state=3)
    assert gap_confidence_interval([(top, shuffled)]) == gap_confidence_interval([(top, bottom)])


def test_gap_interval_pairs_each_seeds_top_with_its_own_bottom_and_averages_the_seeds():
    # Seed 0: FT-Top right on every question, FT-Bottom on none; seed 1 the reverse. Paired
    # by seed and averaged per question, every question's gap is 0, so the interval is 0
    # (FT-Top paired with seed 0's FT-Bottom would give +0.5; the seeds' questions pooled as
    # more questions would spread it around 0). Runs without a partner are left out.
    right, wrong = run_predictions([True] * 20), run_predictions([False] * 20)
    runs = {("top", 0): right, ("bottom", 0): wrong, ("top", 1): wrong, ("bottom", 1): right,
            ("top", 2): right, ("whole", 0): wrong}  # fmt: skip
    assert gap_interval(runs) == (0.0, 0.0)
    assert gap_interval({("top", 0): right, ("bottom", 0): wrong, ("top", 1): wrong, ("bottom", 1): wrong}) == (
        0.5,
        0.5,
    )


def test_gap_interval_refuses_predictions_of_different_questions():
    top = correct_table([True, False], ids=["q0", "q1"])
    bottom = correct_table([True, False], ids=["q0", "q9"])
    with pytest.raises(FactftError, match="cover different test questions"):
        gap_confidence_interval([(top, bottom)])


def relation_run(correct_a, correct_b, guess=None):
    """Predictions of one run over two facts of relation "a" and two of "b"."""
    table = pd.DataFrame({"relation": ["a", "a", "b", "b"], "correct": [*correct_a, *correct_b]})
    return table if guess is None else table.assign(relation_guess=guess)


def test_accuracy_by_relation_averages_each_relation_over_seeds_in_subset_order():
    runs = {
        ("bottom", 0): relation_run([False, False], [True, True], guess=[True, True, False, False]),
        ("top", 0): relation_run([True, True], [True, False], guess=[False, False, False, False]),
        ("top", 1): relation_run([True, False], [False, False], guess=[False, True, False, False]),
    }
    table = accuracy_by_relation("tiny", "synth", runs)
    assert list(zip(table["subset"], table["relation"])) == [("top", "a"), ("top", "b"), ("bottom", "a"), ("bottom", "b")]
    row = table.set_index(["subset", "relation"]).loc[("top", "a")]
    assert (row["model"], row["dataset"], row["n"], row["runs"]) == ("tiny", "synth", 2, 2)
    assert row["mean"] == pytest.approx(0.75) and row["sd"] == pytest.approx(math.sqrt(0.125))
    assert row["guess_mean"] == pytest.approx(0.25)
    bottom_a = table.set_index(["subset", "relation"]).loc[("bottom", "a")]
    assert bottom_a["mean"] == 0.0 and bottom_a["guess_mean"] == 1.0 and math.isnan(bottom_a["sd"])


def test_accuracy_by_relation_of_older_predictions_has_no_guess_and_no_runs_gives_a_header(tmp_path):
    table = accuracy_by_relation("m", "d", {("top", 0): relation_run([True, False], [True, True])})
    assert table["guess_mean"].isna().all() and list(table["mean"]) == [0.5, 1.0]
    sources = [dict(s, predictions=None) for s in make_sources(tmp_path, GRID)]
    make_summary(sources, {}, tmp_path / "s.tsv", tmp_path / "p.tsv", tmp_path / "r.tsv")
    assert (tmp_path / "r.tsv").read_text().split("\n")[0].split("\t") == [
        "model", "dataset", "subset", "relation", "n", "mean", "sd", "guess_mean", "runs"
    ]


def test_paper_table_gives_percent_mean_and_sd_per_subset_and_the_gap_in_markdown(tmp_path):
    summary = summary_table(collect_metrics(make_sources(tmp_path, GRID)))
    lines = paper_table(summary, "markdown").splitlines()
    assert lines[0] == "| Model | Dataset | FT-Top | FT-Bottom | FT-Random | FT-Whole | Top - Bottom | Top - Whole |"
    assert lines[2] == (
        "| tiny | synth | 73.3 ± 15.3 | 43.3 ± 15.3 | 50.0 ± 0.0 | 70.0 ± 10.0 | +30.0 ± 10.0 | +3.3 ± 20.8 |"
    )


def test_paper_table_in_latex_escapes_names_and_leaves_out_subsets_the_grid_lacks(tmp_path):
    grid = {"top": {0: 6}, "bottom": {0: 4}}
    summary = summary_table(collect_metrics(make_sources(tmp_path, grid, model="llama2_7b", dataset="pop&qa")))
    latex = paper_table(summary, "latex")
    assert "Model & Dataset & FT-Top & FT-Bottom & Top $-$ Bottom \\\\" in latex
    assert "llama2\\_7b & pop\\&qa & 60.0 & 40.0 & +20.0 \\\\" in latex  # one seed: no sd
    assert latex.startswith("\\begin{tabular}{llrrr}") and "FT-Random" not in latex
    with pytest.raises(FactftError, match="table format 'html': unknown; formats are markdown, latex"):
        paper_table(summary, "html")


def test_the_cli_prints_only_the_table_when_asked(tmp_path, capsys):
    results = tmp_path / "results"
    tables = results / "tables"
    make_summary(make_sources(results, GRID), {}, tables / "s.tsv", tables / "p.tsv", tables / "r.tsv")
    assert main([str(tables / "s.tsv"), "--table", "latex"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\\begin{tabular}") and out.endswith("\\end{tabular}\n") and "figure" not in out
