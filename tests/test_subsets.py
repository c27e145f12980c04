"""Sized subsets (top25, bottom10, random25): names, config, selection, summary and figure."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_hex
from snakemake.utils import validate

from factft import subsets
from factft.config import SCHEMA, check_config
from factft.errors import FactftError
from factft.plots import STYLES, make_size_figure, plot_accuracy_vs_subset_size
from factft.split import pool_subset, split_facts
from factft.summary import collect_metrics, format_summary, paper_table, summary_table
from factft.tables import read_table, write_table
from test_config import load
from test_split import make_facts
from test_plots import snakemake_in
from test_summary import GRID, make_sources, write_test

@pytest.fixture
def facts():
    return make_facts()


SWEEP = {**GRID, "top25": {0: 5, 1: 6, 2: 6}, "bottom25": {0: 2, 1: 3, 2: 2}, "random10": {0: 4, 1: 4, 2: 5}}


def test_names_parse_into_kind_and_percent_and_read_in_order():
    assert subsets.parse("top") == ("top", None)
    assert subsets.parse("whole") == ("whole", None)
    assert subsets.parse("bottom25") == ("bottom", 25)
    assert subsets.pool_share("top", 0.5) == 0.5
    assert subsets.pool_share("random10", 0.5) == 0.1
    assert subsets.pool_share("whole", 0.5) == 1.0
    assert subsets.label("top25") == "FT-Top 25%"
    assert subsets.ordered(["random10", "top25", "whole", "bottom", "top10", "top"]) == [
        "top", "bottom", "whole", "top10", "top25", "random10"
    ]


@pytest.mark.parametrize("name", ["top0", "top100", "whole50", "top05", "middle", "Top25", "top-25"])
def test_bad_names_are_rejected_by_the_schema_and_the_library(name):
    config = load("demo.yaml")
    config["subsets"] = ["top", name]
    with pytest.raises(Exception, match=re.escape(name)):
        validate(config, str(SCHEMA))
    with pytest.raises(FactftError, match=f"subset '{name}': unknown"):
        subsets.parse(name)


def test_schema_pattern_and_library_accept_the_same_names():
    pattern = re.compile(yaml.safe_load(SCHEMA.read_text())["properties"]["subsets"]["items"]["pattern"])
    percents = ("", "0", "1", "9", "10", "99", "100")
    names = [f"{kind}{p}" for kind in ("top", "bottom", "random", "whole") for p in percents]
    assert [bool(pattern.match(n)) for n in names] == [subsets.is_subset(n) for n in names]


def test_a_sized_subset_that_repeats_a_plain_one_is_rejected_by_name():
    config = load("demo.yaml")
    config["subsets"] = ["top", "bottom", "top50"]
    validate(config, str(SCHEMA))
    with pytest.raises(FactftError, match=r"subsets: 'top50' is the same table as 'top' \(split.fraction 0.5\)"):
        check_config(copy.deepcopy(config))
    config["subsets"] = ["bottom", "top50"]  # without `top` it is just a name for it
    check_config(copy.deepcopy(config))
    config["subsets"] = ["random", "random50"]  # a second random draw of the same size
    check_config(config)


def test_sized_subsets_are_heads_of_the_plain_orders_and_stratified(facts):
    whole = split_facts(facts, fraction=0.5, seed=3)
    pool = whole["whole"]
    top25 = pool_subset(pool, "top25", seed=3)
    bottom25 = pool_subset(pool, "bottom25", seed=3)
    assert set(top25["id"]) <= set(whole["top"]["id"])
    assert set(bottom25["id"]) <= set(whole["bottom"]["id"])
    for relation, group in pool.groupby("relation"):
        assert (top25["relation"] == relation).sum() == len(group) // 4
    assert (top25["split"] == "top25").all()
    assert top25["popularity_pct"].between(0, 100, inclusive="right").all()
    # top25 of the pool is what a split with fraction 0.25 calls top.
    quarter = split_facts(facts, fraction=0.25, seed=3)
    assert top25["id"].tolist() == quarter["top"]["id"].tolist()
    assert bottom25["id"].tolist() == quarter["bottom"]["id"].tolist()


def test_sized_random_subsets_nest_and_ignore_the_pools_row_order(facts):
    pool = split_facts(facts, seed=1)["whole"]
    random10 = pool_subset(pool, "random10", seed=1)
    random25 = pool_subset(pool, "random25", seed=1)
    assert set(random10["id"]) < set(random25["id"])
    shuffled = pool.sample(frac=1.0, random_state=0)
    assert sorted(pool_subset(shuffled, "random25", seed=1)["id"]) == sorted(random25["id"])
    assert pool_subset(pool, "random25", seed=2)["id"].tolist() != random25["id"].tolist()


def test_an_empty_sized_subset_and_the_pool_itself_are_errors_naming_them(facts):
    pool = split_facts(facts, seed=0)["whole"].head(12)
    with pytest.raises(FactftError, match=r"dataset 'tiny': subset 'top5' \(5% of a pool of 12 facts within each"):
        pool_subset(pool, "top5", dataset="tiny")
    with pytest.raises(FactftError, match="'whole' is the pool itself, not a subset cut from it"):
        pool_subset(pool, "whole")


def test_summary_has_columns_for_sized_subsets_in_reading_order_and_prints_them(tmp_path):
    summary = summary_table(collect_metrics(make_sources(tmp_path, SWEEP)))
    means = [c for c in summary.columns if c.endswith("_mean") and not c.startswith("top_minus")]
    assert means == [f"{s}_mean" for s in ("top", "bottom", "random", "whole", "top25", "bottom25", "random10")]
    row = summary.iloc[0]
    assert row["top25_mean"] == pytest.approx(np.mean([0.5, 0.6, 0.6]))
    assert row["top_minus_bottom_mean"] == pytest.approx(np.mean([0.2, 0.4, 0.3]))  # the plain pair only
    text = format_summary(summary)
    assert "FT-Top 25%" in text and "FT-Random 10%" in text
    assert r"FT-Bottom 25\%" in paper_table(summary, "latex")


def test_size_figure_joins_each_selection_to_the_whole_pool_at_100_percent(tmp_path):
    figure = plot_accuracy_vs_subset_size(collect_metrics(make_sources(tmp_path, SWEEP)), "tiny", "synth", 0.5)
    accuracy_ax, guess_ax = figure.axes
    lines = {to_hex(line.get_color()): line for line in accuracy_ax.get_lines() if len(line.get_xdata()) > 1}
    top = lines[to_hex(STYLES["top"]["color"])]
    assert list(top.get_xdata()) == [25, 50, 100]
    assert list(top.get_ydata()) == pytest.approx([np.mean([0.5, 0.6, 0.6]), np.mean([0.6, 0.7, 0.9]), 0.7])
    bottom = lines[to_hex(STYLES["bottom"]["color"])]
    assert list(bottom.get_xdata()) == [25, 50, 100] and bottom.get_ydata()[-1] == pytest.approx(0.7)
    random = lines[to_hex(STYLES["random"]["color"])]
    assert list(random.get_xdata()) == [10, 50, 100]
    assert [t.get_text() for t in accuracy_ax.get_xticklabels()] == ["10%", "25%", "50%", "100%"]
    references = {line.get_linestyle() for line in accuracy_ax.get_lines() if len(line.get_xdata()) == 2}
    assert references == {"--", ":"}  # base zero-shot and cloze
    assert len(guess_ax.get_lines()) >= 3
    assert "FT-Top (most popular first)" in [t.get_text() for t in figure.legends[0].get_texts()]


def test_make_size_figure_writes_png_and_pdf_and_refuses_an_experiment_without_runs(tmp_path):
    sources = make_sources(tmp_path, SWEEP)
    png, pdf = tmp_path / "size.png", tmp_path / "size.pdf"
    make_size_figure(sources, "tiny", "synth", 0.5, [png, pdf])
    assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
    with pytest.raises(FactftError, match="model 'other' on dataset 'synth'"):
        make_size_figure(sources, "other", "synth", 0.5, [tmp_path / "x.png"])
    assert not (tmp_path / "x.png").exists()


def test_snakemake_cuts_sized_subsets_and_draws_the_size_figure_with_its_caption(tmp_path, facts):
    """The rules on the demo config plus sized subsets, with metrics standing in for evaluate."""
    config = load("demo.yaml")
    config["subsets"] = [*config["subsets"], *[s for s in SWEEP if subsets.is_sized(s)]]
    config["split"].update(seed=3, fraction=0.3)  # not the defaults: the rules must pass them on
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    make_sources(tmp_path / "results", SWEEP)
    write_test(tmp_path / "results/synth/splits/test.parquet")
    write_table(split_facts(facts, seed=0)["whole"], tmp_path / "results/synth/splits/whole.parquet")
    targets = [
        "results/synth/splits/top25.parquet",
        "results/synth/splits/random10.parquet",
        "results/figures/tiny/synth/accuracy_vs_subset_size.png",
        "results/tables/summary.tsv",
    ]
    config_path = tmp_path / "config.yaml"
    rules = ["subset", "size_figure", "summary"]
    run = snakemake_in(tmp_path, config_path, targets, "--cores", "1", "--allowed-rules", *rules)
    assert run.returncode == 0, run.stderr[-3000:]
    whole = split_facts(facts, seed=0)["whole"]
    top25 = read_table(tmp_path / "results/synth/splits/top25.parquet")
    assert top25["id"].tolist() == pool_subset(whole, "top25", seed=3)["id"].tolist()
    random10 = read_table(tmp_path / "results/synth/splits/random10.parquet")["id"].tolist()
    assert random10 == pool_subset(whole, "random10", seed=3)["id"].tolist()
    assert random10 != pool_subset(whole, "random10", seed=0)["id"].tolist()
    assert "top25 takes" in (tmp_path / "logs/subset/synth/top25.log").read_text()
    assert (tmp_path / "results/figures/tiny/synth/accuracy_vs_subset_size.pdf").stat().st_size > 5_000
    summary = pd.read_csv(tmp_path / "results/tables/summary.tsv", sep="\t").iloc[0]
    assert summary["bottom25_mean"] == pytest.approx(np.mean([0.2, 0.3, 0.2]), abs=1e-6)
    # The popularity figure compares the paper's four subsets: it waits for no sized run.
    figure = ["results/figures/tiny/synth/accuracy_vs_popularity.png"]
    planned = snakemake_in(tmp_path, config_path, figure, "--dry-run", "--allowed-rules", "figures")
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "results/tiny/synth/bottom/seed2/metrics.tsv" in planned.stdout and "25/seed" not in planned.stdout
    report = snakemake_in(tmp_path, config_path, targets[2:], "--report", "results/report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "results/report.html").read_text()
    assert "30% are the paper's FT-Top" in html  # the caption, with split.fraction filled in


def test_a_grid_of_sized_subsets_alone_plans_everything_but_the_overview_of_the_papers_subsets(tmp_path):
    config = load("demo.yaml")
    config["subsets"] = ["top25", "bottom25"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    planned = snakemake_in(tmp_path, tmp_path / "config.yaml", ["all"], "--dry-run")
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "accuracy_vs_subset_size.png" in planned.stdout and "overview" not in planned.stdout
