import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from factft.errors import FactftError
from factft.metrics import gold_metrics
from factft.plots import (
    GOLD_LABEL,
    STYLES,
    final_losses,
    log_ticks,
    make_figures,
    make_overview,
    make_training_figure,
    plot_accuracy_vs_popularity,
    plot_overview,
    plot_training_loss,
    read_train_logs,
    training_curves,
)
from factft.summary import accuracy_by_percentile, collect_metrics, summary_table
from factft.tables import read_table
from test_summary import GRID, make_sources, write_test

REPO = Path(__file__).resolve().parents[1]


def figure_for(sources):
    return plot_accuracy_vs_popularity(accuracy_by_percentile(collect_metrics(sources)), "tiny", "synth")


def line_colours(figure):
    """Legend label -> colour of that line in each panel."""
    colours = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    return colours


def snakemake_in(workdir, configfile, targets, *options):
    """Snakemake on `targets` in `workdir`, offline. Targets come first: --configfile and
    --allowed-rules take every argument up to the next flag."""
    command = [str(Path(sys.executable).parent / "snakemake"), *targets, "-s", str(REPO / "Snakefile")]
    command += ["-d", str(workdir), "--configfile", str(configfile), *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(command, env=env, capture_output=True, text=True)


def test_the_legend_counts_every_held_out_fact_whatever_percentiles_are_drawn(tmp_path):
    sources = make_sources(tmp_path, GRID)
    for source in sources:  # as with evaluate.percentiles: [10, 50]
        table = pd.read_csv(source["path"], sep="\t")
        table[(table["scope"] != "top") | table["x"].isin([10, 50])].to_csv(source["path"], sep="\t", index=False)
    title = figure_for(sources).legends[0].get_title().get_text()
    assert title.startswith("10 held-out facts;"), title


def test_make_figures_writes_a_png_and_a_pdf(tmp_path):
    png, pdf = tmp_path / "fig" / "a.png", tmp_path / "fig" / "a.pdf"
    make_figures(make_sources(tmp_path, GRID), "tiny", "synth", [png, pdf])
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000
    assert sorted(p.name for p in png.parent.iterdir()) == ["a.pdf", "a.png"]  # no temp files left


def test_pdf_is_byte_identical_for_the_same_metrics(tmp_path):
    sources = make_sources(tmp_path, GRID)
    make_figures(sources, "tiny", "synth", [tmp_path / "1.pdf"])
    make_figures(sources, "tiny", "synth", [tmp_path / "2.pdf"])
    assert (tmp_path / "1.pdf").read_bytes() == (tmp_path / "2.pdf").read_bytes()


def test_figure_has_its_panels_every_line_in_its_subset_colour_and_a_legend_entry(tmp_path):
    figure = figure_for(make_sources(tmp_path, GRID))
    cumulative, deciles, _ = figure.axes
    assert cumulative.get_xlabel() == "held-out facts: the top x% most popular"
    assert "decile" in deciles.get_xlabel() and cumulative.get_ylabel() == "held-out accuracy"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["FT-Top", "FT-Bottom", "FT-Random", "FT-Whole", "Base, zero-shot QA", "Base, cloze (stored facts)"]
    assert "mean over 3 seeds, bands: ± 1 sd" in figure.legends[0].get_title().get_text()
    colours = line_colours(figure)
    assert colours["FT-Top"] == {to_hex(STYLES["top"]["color"])}
    assert colours["FT-Bottom"] == {to_hex(STYLES["bottom"]["color"])}
    # The most popular decile is plotted leftmost, like the top-10% point of the left panel.
    top_deciles = [line for line in deciles.get_lines() if line.get_label() == "FT-Top"][0]
    assert list(top_deciles.get_xdata()) == sorted(top_deciles.get_xdata())
    assert [t.get_text() for t in deciles.get_xticklabels()][0] == "0–10%"


def test_axes_say_model_confidence_where_it_ranks_the_facts(tmp_path):
    data = accuracy_by_percentile(collect_metrics(make_sources(tmp_path, GRID)))
    figure = plot_accuracy_vs_popularity(data, "tiny", "synth", scorer="model_confidence")
    cumulative, deciles, guess = figure.axes
    assert cumulative.get_xlabel() == "held-out facts: the top x% most confidently known"
    assert deciles.get_xlabel().startswith("held-out facts: model confidence decile")
    assert guess.get_xlabel() == "held-out facts: model confidence decile"
    assert "popular" not in figure.get_suptitle() and "model confidence" in figure.get_suptitle()


def test_each_subsets_band_spans_its_mean_plus_and_minus_one_sd_over_seeds(tmp_path):
    data = accuracy_by_percentile(collect_metrics(make_sources(tmp_path, GRID)))
    cumulative = figure_for(make_sources(tmp_path, GRID)).axes[0]
    colour = {to_hex(band.get_facecolor()[0][:3]): band for band in cumulative.collections}
    for subset in ("top", "bottom"):
        rows = data[(data["subset"] == subset) & (data["scope"] == "top")]
        band = colour[to_hex(STYLES[subset]["color"])].get_paths()[0].vertices
        for x, mean, sd in zip(rows["x"], rows["mean"], rows["sd"].fillna(0)):
            at_x = band[np.isclose(band[:, 0], x), 1]
            assert at_x.min() == pytest.approx(mean - sd) and at_x.max() == pytest.approx(mean + sd)


def test_guess_panel_shows_each_subsets_guessing_per_decile_against_the_gold_answers(tmp_path):
    # make_sources' wrong answers are all "London": per decile, a miss is a guess.
    sources = make_sources(tmp_path, GRID)
    test = write_test(tmp_path / "test.parquet")
    gold = gold_metrics(read_table(test), percentiles=())
    figure = plot_accuracy_vs_popularity(accuracy_by_percentile(collect_metrics(sources)), "tiny", "synth", gold)
    guess = figure.axes[2]
    assert "commonest answer" in guess.get_ylabel()
    lines = {line.get_label(): line for line in guess.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"FT-Top", "FT-Bottom", "FT-Random", "FT-Whole", GOLD_LABEL}
    # The least popular decile (plotted rightmost): every FT-Bottom seed misses it, so all guess.
    assert lines["FT-Bottom"].get_ydata()[-1] == pytest.approx(1.0)
    assert list(lines[GOLD_LABEL].get_ydata()) == [0.0] * 8 + [1.0] * 2  # "lyon", the two least popular
    assert GOLD_LABEL in [t.get_text() for t in figure.legends[0].get_texts()]
    # The same line in the decile panel: the accuracy of always answering with it.
    floor = [line for line in figure.axes[1].get_lines() if line.get_label() == GOLD_LABEL][0]
    assert list(floor.get_ydata()) == [0.0] * 8 + [1.0] * 2
    make_figures(sources, "tiny", "synth", [tmp_path / "with_gold.png"], test)
    assert (tmp_path / "with_gold.png").stat().st_size > 10_000


def test_the_few_shot_reference_is_a_line_of_its_own_between_zero_shot_and_cloze(tmp_path):
    figure = figure_for(make_sources(tmp_path, GRID, fewshot=3))
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[-3:] == ["Base, zero-shot QA", "Base, few-shot QA", "Base, cloze (stored facts)"]
    assert line_colours(figure)["Base, few-shot QA"] == {to_hex(STYLES["fewshot"]["color"])}


def test_missing_subsets_keep_the_colours_of_the_full_grid(tmp_path):
    sources = make_sources(tmp_path, {"bottom": {0: 4}, "whole": {0: 8}}, cloze=None)
    figure = figure_for(sources)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["FT-Bottom", "FT-Whole", "Base, zero-shot QA"]
    assert "1 seed (no band)" in figure.legends[0].get_title().get_text()
    colours = line_colours(figure)
    assert colours["FT-Bottom"] == {to_hex(STYLES["bottom"]["color"])}
    assert colours["FT-Whole"] == {to_hex(STYLES["whole"]["color"])}
    make_figures(sources, "tiny", "synth", [tmp_path / "partial.png"])
    assert (tmp_path / "partial.png").stat().st_size > 10_000


@pytest.mark.slow
def test_snakemake_runs_figures_and_summary_and_builds_a_report_with_captions(tmp_path):
    """The rules on the demo config, with metrics and predictions standing in for the evaluate stage."""
    sources = make_sources(tmp_path / "results", GRID)
    write_test(tmp_path / "results/synth/splits/test.parquet")
    targets = [
        "results/tables/summary.tsv",
        "results/figures/tiny/synth/accuracy_vs_popularity.pdf",
        "results/figures/overview.png",
    ]
    demo = REPO / "config" / "demo.yaml"
    run = snakemake_in(tmp_path, demo, targets, "--cores", "1", "--allowed-rules", "figures", "summary", "overview")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results/figures/tiny/synth/accuracy_vs_popularity.png").stat().st_size > 10_000
    summary = pd.read_csv(tmp_path / "results/tables/summary.tsv", sep="\t").iloc[0]
    assert (summary["model"], summary["dataset"], summary["n_test"], summary["n_seeds"]) == ("tiny", "synth", 10, 3)
    assert summary["gold_guess"] == pytest.approx(0.2)
    by_relation = pd.read_csv(tmp_path / "results/tables/accuracy_by_relation.tsv", sep="\t")
    assert list(by_relation["subset"]) == ["top", "bottom", "random", "whole"]  # one relation
    # The overview the rule drew is the one of every run (pdfs of the same data are identical).
    make_overview(sources, tmp_path / "results/tables/summary.tsv", [tmp_path / "expected.pdf"])
    assert (tmp_path / "results/figures/overview.pdf").read_bytes() == (tmp_path / "expected.pdf").read_bytes()
    # The report of just these targets: the other stages (attention, simulation) never ran here.
    report = snakemake_in(tmp_path, demo, targets, "--report", "results/report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "results/report.html").read_text()
    assert "Held-out accuracy of <strong>tiny</strong> on <strong>synth</strong>" in html
    assert "the mean over the seeds 0, 1, 2" in html
    assert "the analog of the paper's results table" in html


def test_plotting_an_experiment_without_metrics_is_an_error_naming_it(tmp_path):
    with pytest.raises(FactftError, match="no metrics for model 'other' on dataset 'synth'"):
        make_figures(make_sources(tmp_path, GRID), "other", "synth", [tmp_path / "x.png"])
    assert not (tmp_path / "x.png").exists()


def overview_of(sources, intervals=None):
    metrics = collect_metrics(sources)
    return plot_overview(metrics, summary_table(metrics, intervals=intervals))


def test_overview_has_a_panel_per_dataset_a_bar_per_subset_and_the_gap_per_model(tmp_path):
    sources = make_sources(tmp_path, GRID, model="m1", dataset="popqa") + make_sources(
        tmp_path, {"top": {0: 5, 1: 7}, "bottom": {0: 4, 1: 4}}, model="m1", dataset="mmlu"
    )
    figure = overview_of(sources)
    popqa, mmlu = figure.axes
    assert (popqa.get_title(), mmlu.get_title()) == ("popqa", "mmlu")
    heights = sorted(round(bar.get_height(), 4) for bar in popqa.patches if bar.get_height() > 0)
    assert heights == sorted(round(h, 4) for h in (22 / 30, 13 / 30, 0.5, 0.7))  # means over seeds
    assert [t.get_text() for t in popqa.texts] == ["Δ +0.30"]
    assert [t.get_text() for t in mmlu.texts] == ["Δ +0.20"]  # (0.1 + 0.3) / 2
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["FT-Top", "FT-Bottom", "FT-Random", "FT-Whole"]
    assert "bootstrap" not in figure.legends[0].get_title().get_text()  # no interval, none named


def test_overview_marks_a_model_that_does_not_run_on_a_dataset(tmp_path):
    """An empty slot would read as accuracy 0 (the demo's tiny model reads only its own world)."""
    sources = make_sources(tmp_path, GRID, model="m1", dataset="popqa") + make_sources(
        tmp_path, GRID, model="m2", dataset="synth"
    )
    popqa, synth = overview_of(sources).axes
    assert [t.get_text() for t in popqa.texts] == ["Δ +0.30", "not run"]
    assert [t.get_text() for t in synth.texts] == ["not run", "Δ +0.30"]


def test_overview_gives_the_gaps_bootstrap_interval_from_the_summary(tmp_path):
    sources = make_sources(tmp_path, GRID, model="m1", dataset="popqa")
    figure = overview_of(sources, intervals={("m1", "popqa", "top_minus_bottom"): (0.21, 0.38)})
    assert [t.get_text() for t in figure.axes[0].texts] == ["Δ +0.30\n[+0.21, +0.38]"]
    assert "bootstrap interval" in figure.legends[0].get_title().get_text()
    summary = tmp_path / "summary.tsv"
    metrics = collect_metrics(sources)
    summary_table(metrics, intervals={("m1", "popqa", "top_minus_bottom"): (0.21, 0.38)}).to_csv(summary, sep="\t", index=False)
    make_overview(sources, summary, [tmp_path / "overview.png"])
    assert (tmp_path / "overview.png").stat().st_size > 10_000


def write_train_logs(root, losses):
    """train_log.tsv files like factft.train writes; losses: {subset: {seed: [loss per step]}}."""
    sources = []
    for subset, by_seed in losses.items():
        for seed, values in by_seed.items():
            steps = len(values)
            log = pd.DataFrame(
                {"step": range(1, steps + 1), "epoch": [i / 4 for i in range(1, steps + 1)], "loss": values}
            )
            path = root / subset / f"seed{seed}" / "train_log.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            log.to_csv(path, sep="\t", index=False)
            sources.append(dict(subset=subset, seed=seed, path=str(path)))
    return sources


def test_training_curves_average_each_span_of_steps_then_the_seeds(tmp_path):
    logs = read_train_logs(
        write_train_logs(tmp_path, {"top": {0: [8, 6, 4, 2], 1: [6, 4, 2, 0]}, "bottom": {0: [9, 7, 5, 3]}})
    )
    curves = training_curves(logs, spans=2)
    top = curves[curves["subset"] == "top"]
    assert top["mean"].tolist() == [6.0, 2.0]  # seed 0: 7, 3; seed 1: 5, 1
    assert top["sd"].tolist() == pytest.approx([2**0.5, 2**0.5])
    assert top["epoch"].tolist() == [0.375, 0.875]  # steps 1-2 and 3-4, a quarter epoch each
    assert curves.loc[curves["subset"] == "bottom", "seeds"].tolist() == [1, 1]
    final = final_losses(logs, share=0.5)  # the last two steps of each run
    assert final["top"] == pytest.approx((3 + 1) / 2) and final["bottom"] == pytest.approx(4.0)


def test_training_figure_writes_png_and_pdf_with_each_subsets_final_loss(tmp_path):
    sources = write_train_logs(
        tmp_path, {s: {0: [9.0 - i * k for i in range(20)], 1: [9.0 - i * k for i in range(20)]}
                   for s, k in (("top", 0.4), ("bottom", 0.3))}
    )
    png, pdf = tmp_path / "fig" / "training_loss.png", tmp_path / "fig" / "training_loss.pdf"
    make_training_figure(sources, "tiny", "synth", [png, pdf])
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF")
    figure = plot_training_loss(read_train_logs(sources), "tiny", "synth")
    (ax,) = figure.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["FT-Top (1.60)", "FT-Bottom (3.45)"]  # the mean of the last 2 of 20 steps
    assert ax.get_yscale() == "log"
    assert line_colours(figure)["FT-Bottom (3.45)"] == {to_hex(STYLES["bottom"]["color"])}


def test_a_train_log_without_steps_or_columns_is_named(tmp_path):
    (tmp_path / "empty.tsv").write_text("step\tepoch\tloss\n")
    (tmp_path / "odd.tsv").write_text("step\tvalue\n1\t2\n")
    with pytest.raises(FactftError, match=r"train log .*empty.tsv: no steps"):
        read_train_logs([dict(subset="top", seed=0, path=str(tmp_path / "empty.tsv"))])
    with pytest.raises(FactftError, match=r"train log .*odd.tsv: no columns \['epoch', 'loss'\]"):
        read_train_logs([dict(subset="top", seed=0, path=str(tmp_path / "odd.tsv"))])
    # A file cut to nothing (a job killed while writing it elsewhere than through write_tsv).
    (tmp_path / "blank.tsv").write_text("")
    with pytest.raises(FactftError, match=r"cannot read train log .*blank.tsv: No columns"):
        read_train_logs([dict(subset="top", seed=0, path=str(tmp_path / "blank.tsv"))])


@pytest.mark.parametrize("low,high", [(0.3, 20.0), (4.6, 9.4), (5.1, 5.9), (9.5, 10.5)])
def test_a_loss_axis_gets_at_least_three_labelled_ticks_inside_its_range(low, high):
    ticks = log_ticks(low, high)
    assert len(set(ticks)) == len(ticks) >= 3 and all(low <= t <= high for t in ticks)
    if high / low > 10:
        assert set(ticks) <= {m * 10.0**e for e in range(-2, 3) for m in (1, 2, 5)}  # round values
