"""The one-layer theory model (factft.theory), its sweeps (factft.sweeps) and tables/figures."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.colors import to_rgb
from snakemake.utils import validate

from factft.config import SCHEMA, load_config
from factft.errors import FactftError
from factft.plots import STYLES, save_figure
from factft.sweeps import (
    BASE,
    BASE_POINT,
    check_settings,
    check_simulation,
    point_settings,
    point_value,
    run_of,
    split_sizes,
    sweep_points,
)
from factft.theory import (
    OneLayerAttention,
    ask,
    fact_salience,
    facts_of,
    finetune_one_layer,
    make_world,
    pretrain_one_layer,
    simulate,
    split_subjects,
)
from factft.theory_plots import (
    LABELS,
    SETTING_LABELS,
    SUBSETS,
    plot_attention,
    plot_gap,
    plot_salience,
    plot_subsets,
    sweep_tables,
    write_sweep_tables,
)

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "subjects": 12,
    "relations": 2,
    "answers_per_relation": 4,
    "answer_zipf": 1.0,
    "zipf": 1.0,
    "min_mentions": 1,
    "embedding": "orthogonal",
    "dim": None,
    "qa_similarity": 0.5,
    "candidates": "relation",
    "pretrain_steps": 20,
    "pretrain_learning_rate": 10.0,
    "finetune_steps": 10,
    "finetune_learning_rate": 1.0,
    "batch_size": 8,
    "test_fraction": 0.25,
    "fraction": 0.5,
    "record_every": 5,
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: a second thread only adds synchronisation, badly so on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo_config():
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


def test_salience_is_answer_embedding_times_value_matrix_times_subject_embedding():
    w_v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # phi(a)^T W_V phi(s) picks W_V[a, s]: row = answer direction, column = subject direction.
    subjects = torch.stack([e1, e2, e1 + e2])
    answers = torch.stack([e2, e1, e2])
    assert fact_salience(w_v, subjects, answers).tolist() == [3.0, 2.0, 7.0]


def test_answer_logits_are_the_attention_weighted_salience_of_subject_and_relation():
    # The mechanism in one identity: logit(a) = w S(s, r, a) + (1 - w) phi(a)^T W_V phi(r), with
    # w the attention on the subject. Attending to the relation swaps the subject's stored
    # answer for the relation's generic one.
    torch.manual_seed(0)
    embeddings = torch.randn(10, 6)
    model = OneLayerAttention(embeddings, answer_tokens=torch.tensor([6, 7, 8, 9]))
    with torch.no_grad():
        model.w_kq.normal_()
        model.w_v.normal_()
    subjects, relations = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 4])
    logits, weight = model(subjects, relations)
    answers = torch.arange(4)
    for i, (s, r) in enumerate(zip(subjects, relations)):
        stored = model.salience(s.repeat(4), answers)
        generic = fact_salience(model.w_v, embeddings[r].repeat(4, 1), embeddings[6:])
        torch.testing.assert_close(logits[i], weight[i] * stored + (1 - weight[i]) * generic)
    assert ((weight > 0) & (weight < 1)).all()


def test_at_the_demo_base_point_salience_follows_mentions_and_ft_top_beats_ft_bottom_in_every_seed():
    """The paper's claim in the theory model at config/demo.yaml's base settings (gap 0.09 over 3 seeds)."""
    settings = demo_config()["simulation"]["settings"]
    for seed in (0, 1, 2):
        tables = simulate(settings, seed)
        accuracy = tables["accuracy"].set_index("subset")["accuracy"]
        assert accuracy["top"] > accuracy["bottom"], (seed, accuracy.to_dict())
        salience = tables["salience"]
        assert salience["mentions"].rank().corr(salience["salience"].rank()) > 0.5  # Spearman


def test_at_the_demo_base_point_the_gap_goes_through_attention_not_the_value_matrix():
    """Freezing W_KQ in finetuning removes the gap (measured: seed gaps -0.01, +0.01, -0.045
    against 0.075, 0.11, 0.085); freezing W_V keeps it. FT-Bottom raises the attention on the
    subject less than FT-Top does."""
    settings = demo_config()["simulation"]["settings"]
    gaps = {None: [], "w_kq": [], "w_v": []}
    for seed in (0, 1, 2):
        world = make_world(settings, seed)
        pretrained = pretrain_one_layer(world, settings)
        splits = split_subjects(world, settings, seed)
        test_s, test_r = facts_of(world, splits["test"])
        for frozen in gaps:
            answered = {}
            for subset in ("top", "bottom"):
                model = copy.deepcopy(pretrained)
                if frozen:
                    getattr(model, frozen).requires_grad_(False)  # SGD skips a parameter without a gradient
                finetune_one_layer(model, world, splits[subset], splits["test"], settings, seed)
                if frozen:
                    assert torch.equal(getattr(model, frozen), getattr(pretrained, frozen))
                answered[subset] = ask(model, world, test_s, test_r, settings["candidates"])
            gaps[frozen].append(answered["top"]["correct"].mean() - answered["bottom"]["correct"].mean())
            if frozen is None:
                assert answered["bottom"]["attention"].mean() < answered["top"]["attention"].mean(), seed
    mean = {frozen: np.mean(values) for frozen, values in gaps.items()}
    assert mean[None] > 0.05 and mean["w_v"] > 0.05, gaps
    assert abs(mean["w_kq"]) < mean[None] / 3, gaps


def test_the_same_seed_gives_identical_tables_and_another_seed_does_not():
    first, again, other = simulate(TINY, 3), simulate(TINY, 3), simulate(TINY, 4)
    for name in ("accuracy", "salience", "attention"):
        pd.testing.assert_frame_equal(first[name], again[name])
    assert not first["salience"]["salience"].equals(other["salience"]["salience"])


def test_a_tiny_sweep_point_reports_every_subset_fact_and_recorded_step():
    tables = simulate({**TINY, "zipf": 1.5}, 0, sweep="zipf")
    accuracy, salience, attention = tables["accuracy"], tables["salience"], tables["attention"]
    assert list(accuracy["subset"]) == ["top", "bottom", "random", "whole"]
    assert accuracy["accuracy"].between(0, 1).all()
    assert (accuracy["sweep"] == "zipf").all() and (accuracy["value"] == 1.5).all()
    assert len(salience) == TINY["subjects"] * TINY["relations"]
    assert sorted(attention["step"].unique()) == [0, 5, 10]
    # Finetuning starts from the same pretrained model for every subset.
    start = attention[attention["step"] == 0]
    assert start["test_accuracy"].nunique() == 1


def test_world_tokens_pools_and_mentions_are_what_the_settings_say():
    for embedding in ("orthogonal", "gaussian"):
        settings = dict(TINY, embedding=embedding, dim=64 if embedding == "gaussian" else None)
        world = make_world(settings, seed=1)
        relation = torch.arange(world.relations)
        pre, qa = world.embeddings[world.pretrain_token(relation)], world.embeddings[world.qa_token(relation)]
        cosine = (pre * qa).sum(-1) / (pre.norm(dim=-1) * qa.norm(dim=-1))
        if embedding == "orthogonal":  # exact: orthonormal rows
            assert torch.allclose(cosine, torch.full_like(cosine, TINY["qa_similarity"]), atol=1e-5)
        # Each fact's answer lies in its relation's pool; each fact is stated min_mentions times at least.
        owner = world.answers // TINY["answers_per_relation"]
        assert (owner == relation[None, :]).all()
        assert world.mentions.sum() == TINY["pretrain_steps"] * TINY["batch_size"]
        assert world.mentions.min() >= TINY["min_mentions"] * world.relations


def test_a_budget_filled_by_min_mentions_states_every_fact_equally_often():
    # 12 subjects x 2 relations x 2 mentions = 48 statements = 6 steps x 8.
    settings = dict(TINY, min_mentions=2, pretrain_steps=6)
    check_settings(settings)
    world = make_world(settings, seed=1)
    assert (world.mentions == 2 * world.relations).all()
    assert len(simulate(settings, seed=1)["accuracy"])


def test_salience_margin_is_the_gold_answers_salience_minus_the_best_other_in_its_pool():
    world = make_world(TINY, seed=2)
    model = OneLayerAttention(world.embeddings, world.answer_tokens)
    with torch.no_grad():
        model.w_v.copy_(torch.randn(model.w_v.shape, generator=torch.Generator().manual_seed(0)))
    subjects, relations = torch.tensor([0, 3, 7, 11]), torch.tensor([0, 1, 1, 0])
    margin = model.salience_margin(world, subjects, relations)
    for i, (s, r) in enumerate(zip(subjects.tolist(), relations.tolist())):
        gold = int(world.answers[s, r])
        pool = [a for a in range(world.relations * world.answers_per_relation) if bool(world.pools()[r, a])]
        with torch.no_grad():
            salience = {a: float(model.salience(torch.tensor([s]), torch.tensor([a]))[0]) for a in pool}
        best_other = max(v for a, v in salience.items() if a != gold)
        assert float(margin[i]) == pytest.approx(salience[gold] - best_other, abs=1e-5)


def test_the_accuracy_table_agrees_with_the_salience_table_and_its_halves():
    settings = dict(TINY, subjects=24)
    tables = simulate(settings, 0)
    accuracy, salience = tables["accuracy"], tables["salience"]
    test = salience[salience["role"] == "test"]
    assert (accuracy["stored"] == test["stored"].mean()).all()
    assert (salience["stored"] == (salience["salience_margin"] > 0)).all()
    # accuracy is the test facts' mean: the head half's and the tail half's, weighted by size.
    subjects = test["subject"].nunique()
    head = (subjects + 1) // 2 * settings["relations"]
    tail = len(test) - head
    weighted = (head * accuracy["accuracy_head"] + tail * accuracy["accuracy_tail"]) / len(test)
    assert np.allclose(accuracy["accuracy"], weighted)
    assert (accuracy["test_facts"] == len(test)).all()


def test_test_subjects_are_never_finetuned_and_top_is_more_mentioned_than_bottom():
    settings = dict(TINY, subjects=40, pretrain_steps=40)
    world = make_world(settings, seed=0)
    splits = split_subjects(world, settings, seed=0)
    for subset in ("top", "bottom", "random", "whole"):
        assert not set(splits[subset]) & set(splits["test"])
    assert world.mentions[splits["top"]].min() >= world.mentions[splits["bottom"]].max()
    assert len(splits["top"]) == len(splits["bottom"]) == len(splits["random"])


def test_test_subjects_are_all_stated_in_pretraining_even_without_min_mentions():
    settings = dict(TINY, subjects=40, pretrain_steps=20, min_mentions=0, zipf=2.0)
    world = make_world(settings, seed=0)
    n_test, _ = split_sizes(settings)
    assert (world.mentions == 0).sum() > 0  # some subjects were never stated
    splits = split_subjects(world, settings, seed=0)
    assert len(splits["test"]) == n_test and (world.mentions[splits["test"]] > 0).all()
    assert sorted(np.concatenate([splits["test"], splits["whole"]])) == list(range(world.subjects))
    with pytest.raises(FactftError, match="pretraining stated .* raise min_mentions"):
        split_subjects(world, dict(settings, test_fraction=0.9), seed=0)


def test_schema_accepts_the_demo_block_and_fills_defaults_for_a_bare_one(tmp_path):
    demo = demo_config()
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))
    config = load_config(path)
    check_simulation(config["simulation"])
    assert set(config["simulation"]["settings"]) == set(TINY)

    bare = copy.deepcopy(demo)
    bare["simulation"] = {"sweeps": {"zipf": [1.0, 2.0]}}
    validate(bare, str(SCHEMA))
    assert bare["simulation"]["seeds"] == [0, 1, 2]
    assert set(bare["simulation"]["settings"]) == set(TINY)


def test_an_unknown_setting_or_sweep_is_rejected_by_name():
    config = demo_config()
    config["simulation"]["settings"]["zipff"] = 1.0
    with pytest.raises(Exception, match="zipff"):
        validate(config, str(SCHEMA))
    config = demo_config()
    config["simulation"]["sweeps"]["batch_size"] = [8, 16]
    with pytest.raises(Exception, match="batch_size"):
        validate(config, str(SCHEMA))


def test_a_point_changes_only_its_swept_setting_and_no_sweeps_means_no_points():
    simulation = {"seeds": [0], "settings": dict(TINY), "sweeps": {"zipf": [0.5, 2.0]}}
    assert sweep_points(simulation) == {BASE: [BASE_POINT], "zipf": ["0.5", "2.0"]}
    settings = point_settings(simulation, "zipf", "2.0")
    assert settings == dict(TINY, zipf=2.0)
    assert point_value(simulation, BASE, BASE_POINT) is None
    assert sweep_points(dict(simulation, sweeps={})) == {}
    with pytest.raises(FactftError, match="values are"):
        point_value(simulation, "zipf", "3.0")


def test_a_sweep_value_equal_to_the_base_value_is_the_base_run():
    simulation = {"seeds": [0], "settings": dict(TINY), "sweeps": {"zipf": [0.5, 1.0], "pretrain_steps": [20]}}
    assert run_of(simulation, "zipf", "1.0") == (BASE, BASE_POINT)
    assert run_of(simulation, "pretrain_steps", "20") == (BASE, BASE_POINT)
    assert run_of(simulation, "zipf", "0.5") == ("zipf", "0.5")
    assert run_of(simulation, BASE, BASE_POINT) == (BASE, BASE_POINT)


def test_orthogonal_embeddings_with_too_few_dimensions_fail_before_any_training():
    simulation = {"seeds": [0], "settings": dict(TINY, dim=8), "sweeps": {"zipf": [1.0]}}
    with pytest.raises(FactftError, match="dim"):
        check_simulation(simulation)
    simulation["sweeps"] = {"pretrain_steps": [1]}
    simulation["settings"]["dim"] = None
    with pytest.raises(FactftError, match="pretrain_steps = 1"):
        check_simulation(simulation)
    # A sweep point with so few subjects that one test subject would be left.
    simulation["sweeps"] = {"subjects": [4]}
    with pytest.raises(FactftError, match="4 subjects leave 1 test subjects"):
        check_simulation(simulation)


def test_gap_is_top_minus_bottom_per_seed_and_summary_counts_seeds_where_top_wins():
    rows = []
    for value, seed, top, bottom in [(1.0, 0, 0.8, 0.5), (1.0, 1, 0.6, 0.7), (2.0, 0, 0.9, 0.4)]:
        for subset, accuracy in [("top", top), ("bottom", bottom), ("random", 0.6), ("whole", 0.6)]:
            rows.append(
                {"sweep": "zipf", "value": value, "seed": seed, "subset": subset,
                 "accuracy": accuracy, "accuracy_head": accuracy}
            )
    tables = sweep_tables([pd.DataFrame(rows)])
    gap = tables["gap"].set_index(["value", "seed"])["gap"]
    assert gap.loc[(1.0, 0)] == pytest.approx(0.3) and gap.loc[(1.0, 1)] == pytest.approx(-0.1)
    summary = tables["gap_summary"].set_index("value")
    assert summary.loc[1.0, "gap"] == pytest.approx(0.1)
    assert summary.loc[1.0, "seeds_top_above"] == 1 and summary.loc[2.0, "seeds"] == 1


def test_a_sweep_point_read_from_the_base_run_is_tagged_with_the_value_it_stands_for(tmp_path):
    """A sweep's point at the base settings reads the base run's table (tagged sweep "base",
    no value; factft.sweeps.run_of): the sweep's tables give it the sweep and its value."""
    paths = []
    for sweep, value, top in [("base", None, 0.8), ("zipf", 2.0, 0.9)]:
        rows = [
            dict(sweep=sweep, value=value, seed=0, subset=subset, accuracy=accuracy, accuracy_head=accuracy)
            for subset, accuracy in [("top", top), ("bottom", 0.5), ("random", 0.6), ("whole", 0.6)]
        ]
        paths.append(tmp_path / f"{sweep}.parquet")
        pd.DataFrame(rows).to_parquet(paths[-1])
    outputs = {name: tmp_path / f"{name}.tsv" for name in ("accuracy", "gap", "gap_summary")}
    write_sweep_tables(paths, outputs, "zipf", [1.0, 2.0])
    gap = pd.read_csv(outputs["gap"], sep="\t")
    assert list(gap["sweep"]) == ["zipf", "zipf"] and list(gap["value"]) == [1.0, 2.0]
    assert list(gap["gap"]) == pytest.approx([0.3, 0.4])
    with pytest.raises(ValueError):  # a value per table: one missing is an error, not a shorter table
        write_sweep_tables(paths, outputs, "zipf", [1.0])


def test_base_point_tables_and_every_figure_are_written(tmp_path):
    runs = [simulate(TINY, seed) for seed in (0, 1)]
    tables = sweep_tables([run["accuracy"] for run in runs])
    assert len(tables["gap_summary"]) == 1 and tables["gap_summary"]["seeds"].item() == 2
    salience = pd.concat([run["salience"] for run in runs])
    attention = pd.concat([run["attention"] for run in runs])
    gap = tables["gap"].assign(value=[1.0, 2.0])
    figures = {
        "subsets": plot_subsets(tables["accuracy"]),
        "gap": plot_gap(gap, "zipf"),
        "salience": plot_salience(salience),
        "attention": plot_attention(attention),
    }
    for name, figure in figures.items():
        save_figure(figure, [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"])
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0


# Hand-made results in the shape of the simulation's tables, for the figures' layout tests.
SEED_ACCURACY = {0: [0.5, 0.4, 0.45, 0.45], 1: [0.9, 0.8, 0.85, 0.85]}  # top above bottom in each seed


def tiny_accuracy():
    return pd.DataFrame(
        [
            {"seed": seed, "subset": subset, "accuracy": accuracy, "stored": 1.0, "pretrained_accuracy": 0.3}
            for seed, row in SEED_ACCURACY.items()
            for subset, accuracy in zip(SUBSETS, row)
        ]
    )


def tiny_gap(values=(100, 300, 1000)):
    return pd.DataFrame(
        [
            dict(value=value, seed=seed, top=0.5 + i / 10, bottom=0.4 + i / 10, gap=0.1, gap_head=0.05)
            for i, value in enumerate(values)
            for seed in (0, 1)
        ]
    )


def tiny_salience():
    roles = ["top", "bottom", "test"]
    return pd.DataFrame({"mentions": [40, 10, 20], "salience": [2.0, 0.5, 1.0], "role": roles, "seed": 0})


def tiny_attention():
    return pd.DataFrame(
        [
            {"step": step, "subset": subset, "seed": 0, "test_attention_subject": 0.6, "test_accuracy": 0.5}
            for step in (0, 10, 20)
            for subset in SUBSETS
        ]
    )


def subset_colours():
    return {to_rgb(STYLES[subset]["color"]) for subset in SUBSETS}


def test_gap_figure_ticks_the_swept_values_names_the_setting_and_draws_the_gap_in_no_subset_colour():
    figure = plot_gap(tiny_gap(), "pretrain_steps")
    gap_ax, accuracy_ax = figure.axes
    for ax in (gap_ax, accuracy_ax):
        assert ax.get_xscale() == "log"
        assert list(ax.get_xticks()) == [100, 300, 1000]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "300", "1000"]
        assert list(ax.get_xticks(minor=True)) == []
        assert ax.get_xlabel() == SETTING_LABELS["pretrain_steps"]
    title = figure.get_suptitle()
    assert SETTING_LABELS["pretrain_steps"] in title and "pretrain_steps" not in title
    gap_lines = [line for line in gap_ax.get_lines() if line.get_label().startswith("gap")]
    assert len(gap_lines) == 2
    assert all(to_rgb(line.get_color()) not in subset_colours() for line in gap_lines)
    # The absolute accuracies beside the gap, on a scale from 0 that shows a ceiling.
    accuracies = {line.get_label(): list(line.get_ydata()) for line in accuracy_ax.get_lines()}
    assert accuracies == {"FT-Top": pytest.approx([0.5, 0.6, 0.7]), "FT-Bottom": pytest.approx([0.4, 0.5, 0.6])}
    assert accuracy_ax.get_ylim()[0] == 0


def test_gap_figure_keeps_a_linear_axis_for_a_narrow_sweep_and_still_ticks_every_value():
    ax = plot_gap(tiny_gap(values=(0.5, 1.0, 1.5, 2.0)), "zipf").axes[0]
    assert ax.get_xscale() == "linear"
    assert list(ax.get_xticks()) == [0.5, 1.0, 1.5, 2.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "1", "1.5", "2"]


def test_every_simulation_figure_has_one_legend_outside_its_axes():
    figures = {
        "subsets": plot_subsets(tiny_accuracy()),
        "gap": plot_gap(tiny_gap(), "zipf"),
        "salience": plot_salience(tiny_salience()),
        "attention": plot_attention(tiny_attention()),
    }
    for name, figure in figures.items():
        figure.draw_without_rendering()
        assert len(figure.legends) == 1 and all(ax.get_legend() is None for ax in figure.axes), name
        legend = figure.legends[0].get_window_extent()
        assert not any(legend.overlaps(ax.get_window_extent()) for ax in figure.axes), name


def test_subsets_figure_joins_each_seeds_dots_across_the_subsets():
    ax = plot_subsets(tiny_accuracy()).axes[0]
    joined = [list(line.get_ydata()) for line in ax.get_lines() if len(line.get_xdata()) == len(SUBSETS)]
    assert sorted(joined) == sorted(SEED_ACCURACY.values())
    # One offset per seed in every bar, so a line runs parallel to the bars' positions.
    for line in ax.get_lines():
        if len(line.get_xdata()) == len(SUBSETS):
            assert np.allclose(np.diff(line.get_xdata()), 1)


def test_attention_figure_draws_every_subset_in_its_shared_style_on_one_0_1_scale():
    figure = plot_attention(tiny_attention())
    for ax in figure.axes:
        assert ax.get_ylim() == (0, 1)
        lines = {line.get_label(): line for line in ax.get_lines()}
        for subset in SUBSETS:
            line = lines[LABELS[subset]]
            assert to_rgb(line.get_color()) == to_rgb(STYLES[subset]["color"])
            assert line.get_marker() == STYLES[subset]["marker"]
            assert line.get_linestyle() == STYLES[subset]["linestyle"]
            assert line.get_alpha() is None
    # Two tokens to attend to: the unlabelled 0.5 line read as a threshold.
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend[-1] == "even split: subject and relation token"
    assert figure.get_suptitle() == "Through finetuning, one seed"


def test_salience_figure_draws_test_subjects_underneath_the_finetuning_subsets():
    ax = plot_salience(tiny_salience()).axes[0]
    zorder = {points.get_label(): points.get_zorder() for points in ax.collections}
    assert zorder["test subjects"] < min(zorder["FT-Top subjects"], zorder["FT-Bottom subjects"])


@pytest.mark.slow
def test_workflow_runs_a_tiny_simulation_sweep_to_its_gap_figure(tmp_path):
    config = demo_config()
    # zipf 1.0 is the base value: that point reads the base run, computed once.
    config["simulation"] = {"seeds": [0, 1], "settings": TINY, "sweeps": {"zipf": [1.0, 1.5]}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    mechanism = ("salience_vs_mentions", "attention_through_finetuning")
    targets = [f"results/figures/simulation/{name}.png" for name in ("gap_vs_zipf", "subsets", *mechanism)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(configfile),
         "--directory", str(tmp_path), "--cores", "1", "--quiet", "progress", "--", *targets, f"results/simulation/{BASE}/gap_summary.tsv"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((tmp_path / target).stat().st_size > 0 for target in targets)
    summary = pd.read_csv(tmp_path / "results/simulation/zipf/gap_summary.tsv", sep="\t")
    assert list(summary["value"]) == [1.0, 1.5] and set(summary["sweep"]) == {"zipf"}
    # Each run's table is tagged with its own point and seed.
    gaps = pd.read_csv(tmp_path / "results/simulation/zipf/gap.tsv", sep="\t")
    assert sorted(zip(gaps["value"], gaps["seed"])) == [(1.0, 0), (1.0, 1), (1.5, 0), (1.5, 1)]
    assert np.isfinite(summary["gap"]).all()
    base = pd.read_csv(tmp_path / f"results/simulation/{BASE}/gap_summary.tsv", sep="\t")
    assert summary.iloc[0]["gap"] == base.iloc[0]["gap"]
    # The point at the base value holds the base runs, seed by seed, and the other point not.
    columns = ["seed", *SUBSETS]
    base_runs = pd.read_csv(tmp_path / f"results/simulation/{BASE}/gap.tsv", sep="\t")[columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(gaps[gaps["value"] == 1.0][columns].reset_index(drop=True), base_runs)
    assert not gaps[gaps["value"] == 1.5][columns].reset_index(drop=True).equals(base_runs)
    assert not (tmp_path / "results/simulation/zipf/1.0").exists()
    # The mechanism figures draw the base runs' own tables: each as drawn here from them.
    for name, table, plot in [(mechanism[0], "salience", plot_salience), (mechanism[1], "attention", plot_attention)]:
        runs = sorted((tmp_path / f"results/simulation/{BASE}/{BASE_POINT}").glob(f"seed*/{table}.parquet"))
        assert len(runs) == 2
        save_figure(plot(pd.concat(map(pd.read_parquet, runs), ignore_index=True)), [tmp_path / f"{name}.pdf"])
        drawn = (tmp_path / f"results/figures/simulation/{name}.pdf").read_bytes()
        assert drawn == (tmp_path / f"{name}.pdf").read_bytes(), name
