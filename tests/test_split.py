"""Splits: test subjects held out, top/bottom by popularity within relation, deterministic."""

import copy
import logging
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from factft.errors import FactftError
from factft.split import SPLITS, percentiles, pool_subset, split_facts, split_part, tie_breaks
from factft.tables import check_facts, read_table, write_table
from test_plots import snakemake_in


@pytest.fixture
def facts():
    return make_facts()


def make_facts():
    """40 subjects x 3 relations, relations of different popularity, some tied scores."""
    rng = np.random.default_rng(7)
    rows = []
    for s in range(40):
        for r, scale in (("born", 1.0), ("works", 10.0), ("plays", 100.0)):
            rows.append(
                {
                    "id": f"f{s:02d}{r}",
                    "question": f"q {s} {r}",
                    "answers": [f"a{s}"],
                    "subject": f"s{s:02d}",
                    "relation": r,
                    "popularity": float(scale * rng.integers(0, 8)),
                }
            )
    table = pd.DataFrame(rows)
    return table.assign(popularity_source="test")


def test_test_subjects_never_appear_in_the_pool(facts):
    splits = split_facts(facts, test_fraction=0.25, seed=0)
    test_subjects = set(splits["test"]["subject"])
    assert len(test_subjects) == 10
    for name in ("top", "bottom", "random", "whole"):
        assert not test_subjects & set(splits[name]["subject"])
    assert len(splits["whole"]) + len(splits["test"]) == len(facts)


def test_top_and_bottom_do_not_overlap_and_respect_popularity_within_relation(facts):
    splits = split_facts(facts, fraction=0.5, stratify="relation", seed=0)
    top, bottom, whole = splits["top"], splits["bottom"], splits["whole"]
    assert not set(top["id"]) & set(bottom["id"])
    for relation, group in whole.groupby("relation"):
        k = len(group) // 2
        top_r, bottom_r = top[top["relation"] == relation], bottom[bottom["relation"] == relation]
        assert len(top_r) == len(bottom_r) == len(splits["random"].query("relation == @relation")) == k
        assert top_r["popularity"].min() >= bottom_r["popularity"].max()


def test_random_is_a_uniform_sample_of_the_pool_not_top_or_bottom(facts):
    # Over many split seeds a fact of FT-Top lands in FT-Random about half the time, and so
    # does one of FT-Bottom: a random subset tied to either end of the ranking would not.
    in_random = {"top": [], "bottom": []}
    for seed in range(40):
        splits = split_facts(facts, fraction=0.5, seed=seed)
        chosen = set(splits["random"]["id"])
        for name in in_random:
            in_random[name] += [fact in chosen for fact in splits[name]["id"]]
    assert 0.45 < np.mean(in_random["top"]) < 0.55 and 0.45 < np.mean(in_random["bottom"]) < 0.55
    one, other = (set(split_facts(facts, seed=seed)["random"]["id"]) for seed in (0, 1))
    assert one != other


def test_stratified_subsets_share_the_relation_mix_unstratified_do_not(facts):
    stratified = split_facts(facts, stratify="relation", seed=0)
    mixes = [
        stratified[n]["relation"].value_counts().sort_index().tolist() for n in ("top", "bottom", "random")
    ]
    assert mixes[0] == mixes[1] == mixes[2]
    # Without stratification the most popular half is dominated by the high-scale relation.
    plain = split_facts(facts, stratify="none", seed=0)
    assert plain["top"]["relation"].value_counts().idxmax() == "plays"
    plays = [(plain[n]["relation"] == "plays").sum() for n in ("top", "bottom")]
    assert plays[0] > 2 * plays[1]


def test_ties_are_broken_by_the_seed_whatever_the_row_order(facts):
    tied = facts.assign(popularity=(np.arange(len(facts)) % 5 == 0).astype(float))  # 80% tied at 0
    shuffled = tied.sample(frac=1.0, random_state=3)
    for stratify in ("relation", "none"):
        a = split_facts(tied, stratify=stratify, seed=0)
        b = split_facts(shuffled, stratify=stratify, seed=0)
        for name in SPLITS:
            assert sorted(a[name]["id"]) == sorted(b[name]["id"])
            pct = [t.set_index("id")["popularity_pct"].sort_index() for t in (a[name], b[name])]
            assert pct[0].equals(pct[1])
        assert not set(a["top"]["id"]) & set(a["bottom"]["id"])
        if stratify == "none":
            # Among ties, top is the head of the same seeded order that ranks the percentiles.
            whole = a["whole"].sort_values("popularity_pct", ascending=False)["id"].tolist()
            assert set(a["top"]["id"]) == set(whole[: len(a["top"])])


def test_popularity_pct_is_the_percentile_within_each_table(facts):
    splits = split_facts(facts, seed=0)
    for name, table in splits.items():
        assert (table["split"] == name).all()
        # Each fact its own rank: the top x% is x% of the facts, whatever the ties.
        n = len(table)
        assert sorted(table["popularity_pct"]) == pytest.approx([100.0 * (i + 1) / n for i in range(n)])
        by_pct = table.sort_values("popularity_pct")["popularity"]
        assert by_pct.is_monotonic_increasing
        check_facts(table, name)


def percentile_ranks(table: pd.DataFrame, seed: int):
    return percentiles(table["popularity"], tie_breaks(table["id"], seed))


def test_tied_popularity_is_ordered_by_a_seeded_hash_of_the_id_not_by_row_order():
    table = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "popularity": [5.0, 1.0, 5.0, 3.0, 5.0]})
    pct = dict(zip(table["id"], percentile_ranks(table, seed=0)))
    assert (pct["b"], pct["d"]) == (20.0, 40.0)
    assert sorted(pct[i] for i in "ace") == [60.0, 80.0, 100.0]
    shuffled = table.iloc[[4, 2, 0, 3, 1]]
    assert dict(zip(shuffled["id"], percentile_ranks(shuffled, seed=0))) == pct
    orders = {tuple(sorted("ace", key=dict(zip(table["id"], percentile_ranks(table, seed))).get)) for seed in range(8)}
    assert len(orders) > 1  # another seed, another order among the ties


# split_part(make_facts(), "test", seed=3, test_fraction=0.25) before subjects were grouped.
EXPECTED_SEED3 = ["s00", "s03", "s09", "s16", "s21", "s26", "s30", "s32", "s34", "s37"]


def test_subjects_that_share_a_question_are_held_out_together(facts, caplog):
    # A copy of a fact under another subject, with another alias and in other case: the model
    # reads the same prompt, so one must not be tested while its twin is finetuned on.
    caplog.set_level(logging.INFO)
    twins = facts[facts["subject"] < "s10"].assign(
        id=lambda t: t["id"] + "-twin",
        subject=lambda t: t["subject"] + "-twin",
        question=lambda t: t["question"].str.upper() + " ",
        answers=lambda t: t["answers"].map(lambda answers: [*answers, "alias"]),
    )
    both = pd.concat([facts, twins], ignore_index=True)
    for seed in range(5):
        test = split_part(both, "test", seed=seed, test_fraction=0.25)
        pool = split_part(both, "whole", seed=seed, test_fraction=0.25)
        held = set(test["subject"])
        assert {s.removesuffix("-twin") for s in held} == {s for s in held if not s.endswith("-twin")}
        assert not {s.removesuffix("-twin") for s in held} & {s.removesuffix("-twin") for s in pool["subject"]}
    assert "dataset 'facts': 20 subjects share questions, held out together in 10 groups" in caplog.text
    # Without shared questions each subject is its own group: the split is the one it always was
    # (the subjects held out before groups, 2026-12-02).
    alone = split_part(facts, "test", seed=3, test_fraction=0.25)
    assert sorted(set(alone["subject"])) == EXPECTED_SEED3
    # A template for part of the questions makes one large group: a warning names it.
    templated = facts.assign(question=facts["question"].mask(facts["subject"] < "s24", "Who plays it?"))
    caplog.clear()
    split_part(templated, "test", dataset="qa", seed=0, test_fraction=0.3)
    warning = "dataset 'qa': 24 subjects share questions and are held out as one group of 72 of the 120 facts"
    assert warning in caplog.text


def test_a_question_every_subject_shares_is_named_as_a_mapped_template(facts):
    template = facts.assign(question="What is it?")
    message = r"its 40 subjects all share questions, so none can be held out; .*columns\.question"
    with pytest.raises(FactftError, match=message):
        split_part(template, "test", dataset="qa")
    # Multiple choice: the same question with other choices is another prompt.
    choices = template.assign(choices=[[f"c{i}", "d"] for i in range(len(template))], answer_index=0)
    assert 0 < len(split_part(choices, "test", dataset="qa")) < len(choices)


def test_pool_and_test_caps_take_seeded_samples(facts):
    splits = split_facts(facts, pool_size=30, test_size=12, seed=1)
    assert len(splits["whole"]) == 30 and len(splits["test"]) == 12
    again = split_facts(facts, pool_size=30, test_size=12, seed=1)
    assert again["whole"]["id"].tolist() == splits["whole"]["id"].tolist()
    other = split_facts(facts, pool_size=30, test_size=12, seed=2)
    assert other["whole"]["id"].tolist() != splits["whole"]["id"].tolist()


def test_a_cap_above_the_dataset_size_keeps_every_fact_and_says_so(facts, caplog):
    with caplog.at_level(logging.INFO, logger="factft"):
        capped = split_facts(facts, dataset="small", pool_size=10**6, seed=1)
    assert capped["whole"]["id"].tolist() == split_facts(facts, seed=1)["whole"]["id"].tolist()
    assert f"dataset 'small': split.pool_size 1000000: all {len(capped['whole'])} facts kept" in caplog.text


def test_one_popularity_for_every_fact_is_an_error_and_mostly_tied_subsets_a_warning(facts, caplog):
    with pytest.raises(FactftError, match=r"dataset 'flat': every fact .* same popularity \(e\.g\. 5\).*popularity"):
        split_facts(facts.assign(popularity=5.0), dataset="flat", seed=0)
    mostly_zero = facts.assign(popularity=(np.arange(len(facts)) % 5 == 0).astype(float))
    with caplog.at_level(logging.INFO, logger="factft"):
        split_facts(mostly_zero, dataset="zeros", seed=0)
    assert "dataset 'zeros':" in caplog.text and "no more popular than FT-Bottom's most popular" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="factft"):
        split_facts(facts, dataset="ranked", seed=0)
    assert "no more popular" not in caplog.text


def test_fraction_one_makes_top_bottom_and_random_the_whole_pool(facts):
    splits = split_facts(facts, fraction=1.0, seed=0)
    for name in ("top", "bottom", "random"):
        assert splits[name]["id"].tolist() == splits["whole"]["id"].tolist()


def test_subset_that_would_be_empty_names_fraction_and_pool_size(facts):
    with pytest.raises(
        FactftError, match=r"dataset 'tiny': split\.fraction 0\.1 of a pool of 6 facts within each relation"
    ):
        split_facts(facts.head(9), dataset="tiny", fraction=0.1, test_fraction=0.3, seed=0)


def test_same_inputs_and_seed_write_byte_identical_files(facts, tmp_path):
    for run in ("a", "b"):
        for name, table in split_facts(facts.sample(frac=1.0, random_state=0), seed=5).items():
            write_table(table, tmp_path / run / f"{name}.parquet")
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == (
            tmp_path / "b" / f"{name}.parquet"
        ).read_bytes()


def test_each_table_reads_only_its_own_settings(facts):
    """The workflow makes each table in a job of its own, from the settings that shape it."""
    whole = split_part(facts, "whole", pool_size=50, seed=2)
    assert whole.equals(split_part(facts, "whole", pool_size=50, test_size=3, seed=2))
    test = split_part(facts, "test", test_size=10, seed=2)
    assert test.equals(split_part(facts, "test", test_size=10, pool_size=7, seed=2))
    together = split_facts(facts, pool_size=50, test_size=10, fraction=0.3, seed=2)
    assert together["whole"].equals(whole) and together["test"].equals(test)
    for name in ("top", "bottom", "random"):
        assert pool_subset(whole, name, fraction=0.3, seed=2).equals(together[name])
    assert pool_subset(whole, "top25", fraction=0.3, seed=2).equals(pool_subset(whole, "top25", seed=2))


def test_the_seed_changes_the_test_subjects(facts):
    a = set(split_facts(facts, seed=0)["test"]["subject"])
    b = set(split_facts(facts, seed=1)["test"]["subject"])
    assert a != b and len(a) == len(b)


@pytest.mark.slow
def test_dataset_added_only_by_config_flows_through_download_popularity_and_split(data_dir, tmp_path):
    # The 30 good rows, then 4 without answers (dropped by download) and 4 without a number
    # for fame (dropped by popularity): 4 of 38 rows, then 4 of 34, both more than the default
    # split.max_drop_fraction of 0.1.
    bad = [f"Which river flows through Nowhere{i}?,,Nowhere{i},rivers,5\n" for i in range(4)]
    bad += [f"Which river flows through Unsung{i}?,Danube,Unsung{i},rivers,unknown\n" for i in range(4)]
    (tmp_path / "trivia.csv").write_text((data_dir / "custom" / "trivia.csv").read_text() + "".join(bad))
    config = {
        "datasets": {
            "trivia": {
                "source": {"path": "trivia.csv"},
                "columns": {"question": "prompt", "answers": "gold", "subject": "entity", "relation": "rel"},
                "popularity": {"scorer": "column", "column": "fame"},
                "split": {"pool_size": 12},  # this dataset's cap, over the top-level block
            }
        },
        # A valid config needs a model; the split target never builds it.
        "models": {"local": {"source": {"path": "no-such-model"}}},
        "split": {"test_fraction": 0.2},
    }

    def snakemake(max_drop_fraction: float, *targets: str, options=("--cores", "1")) -> subprocess.CompletedProcess:
        config["split"]["max_drop_fraction"] = max_drop_fraction
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        return snakemake_in(tmp_path, tmp_path / "config.yaml", targets, *options)

    # At 0.1 the download stops (4 of 38 is 0.105); at 0.11 it keeps its 34 rows and the
    # popularity job stops (4 of 34).
    result = snakemake(0.1, "results/trivia/facts.parquet")
    assert result.returncode != 0
    assert "dataset 'trivia': 4 of 38 rows are invalid ({'no answers': 4}), more than split.max_drop_fraction 0.1;" in (
        tmp_path / "logs" / "download" / "trivia.log"
    ).read_text()
    assert not (tmp_path / "resources" / "datasets" / "trivia" / "raw.parquet").exists()
    result = snakemake(0.11, "results/trivia/facts.parquet")
    assert result.returncode != 0
    assert len(read_table(tmp_path / "resources" / "datasets" / "trivia" / "raw.parquet")) == 34
    assert "dataset 'trivia': kept 34 of 38 rows" in (tmp_path / "logs" / "download" / "trivia.log").read_text()
    stop = "dataset 'trivia' (popularity column:fame): 4 of 34 rows are invalid"
    assert f"{stop} ({{'popularity missing or not a number': 4}}), more than split.max_drop_fraction 0.11" in (
        tmp_path / "logs" / "popularity" / "trivia.log"
    ).read_text()
    assert not (tmp_path / "results" / "trivia" / "facts.parquet").exists()
    raw = tmp_path / "resources" / "datasets" / "trivia" / "raw.parquet"
    downloaded = raw.stat().st_mtime_ns
    tables = [f"results/trivia/splits/{name}.parquet" for name in SPLITS]
    result = snakemake(0.2, *tables)
    assert result.returncode == 0, result.stderr[-3000:]
    # A run-time setting: the finished download is not redone for it (nor is anything after it).
    assert raw.stat().st_mtime_ns == downloaded
    facts = read_table(tmp_path / "results" / "trivia" / "facts.parquet")
    check_facts(facts, "trivia")
    assert len(facts) == 30 and set(facts["popularity_source"]) == {"column:fame"}
    splits = {name: read_table(tmp_path / "results" / "trivia" / "splits" / f"{name}.parquet") for name in SPLITS}
    top, bottom = splits["top"], splits["bottom"]
    assert len(top) == len(bottom) > 0 and top["popularity"].mean() > bottom["popularity"].mean()
    assert len(splits["whole"]) == 12
    assert "split.pool_size 12: a seeded sample of 12" in (tmp_path / "logs/split/trivia/whole.log").read_text()
    # Each table in its own file: the held-out subjects apart from the pool, FT-Random inside it.
    assert set(splits["test"]["subject"]).isdisjoint(splits["whole"]["subject"]) and len(splits["test"])
    assert set(splits["random"]["id"]) < set(splits["whole"]["id"]) and len(splits["random"]) == len(top)

    # A setting reruns the tables it shapes and no others: split.fraction or stratify the three
    # cut by it (FT-Whole's runs stay), a test-set cap the test set (no finetune), the pool's
    # cap the pool and all cut from it; the top-level pool cap is the dataset's own here.
    def planned(change) -> dict[str, int]:
        before = copy.deepcopy(config)
        change(config)
        result = snakemake(0.2, *tables, options=("--dry-run",))
        config.clear()
        config.update(before)
        assert result.returncode == 0, result.stderr[-3000:]
        return {rule: int(n) for rule, n in re.findall(r"^(split|subset)\s+(\d+)$", result.stdout, re.MULTILINE)}

    assert planned(lambda c: None) == {}
    assert planned(lambda c: c["split"].update(fraction=0.3)) == {"subset": 3}
    assert planned(lambda c: c["split"].update(stratify="none")) == {"subset": 3}
    assert planned(lambda c: c["split"].update(test_size=4)) == {"split": 1}
    assert planned(lambda c: c["split"].update(pool_size=5)) == {}
    assert planned(lambda c: c["datasets"]["trivia"]["split"].update(pool_size=10)) == {"split": 1, "subset": 3}
    assert planned(lambda c: c["split"].update(seed=1)) == {"split": 2, "subset": 3}


@pytest.mark.slow
def test_a_split_table_over_1_mb_rebuilt_the_same_reruns_nothing_after_it(data_dir, tmp_path):
    """Split tables of a large dataset pass Snakemake's default 1 MB content check: the
    workflow's own profile (profiles/default) raises it, so `snakemake data` after a data edit
    leaves the runs on tables that came out the same (README, The paper's grid)."""
    rows = (data_dir / "custom" / "trivia.csv").read_text().splitlines()
    notes = np.random.default_rng(0).integers(0, 16**8, size=(len(rows) - 1, 8000))
    text = [rows[0] + ",notes"] + [f"{row},{''.join(f'{n:08x}' for n in line)}" for row, line in zip(rows[1:], notes)]
    (tmp_path / "trivia.csv").write_text("\n".join(text) + "\n")  # 64 KB of noise a row: no compression
    config = {
        "datasets": {
            "trivia": {
                "source": {"path": "trivia.csv"},
                "columns": {"question": "prompt", "answers": "gold", "subject": "entity", "relation": "rel"},
                "keep_columns": ["notes"],
                "popularity": {"scorer": "column", "column": "fame"},
            }
        },
        "models": {"local": {"source": {"path": "no-such-model"}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    top = "results/trivia/splits/top.parquet"
    done = snakemake_in(tmp_path, tmp_path / "config.yaml", [top], "--cores", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    whole = tmp_path / "results" / "trivia" / "splits" / "whole.parquet"
    assert whole.stat().st_size > 1_000_000
    before = whole.read_bytes()
    again = snakemake_in(tmp_path, tmp_path / "config.yaml", [str(whole.relative_to(tmp_path))], "--cores", "1",
                         "--forcerun", "split")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert whole.read_bytes() == before
    plan = snakemake_in(tmp_path, tmp_path / "config.yaml", [top], "--dry-run")
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout[-2000:]
    # Snakemake's own limit would plan FT-Top's table again: the profile is what keeps it.
    plain = snakemake_in(tmp_path, tmp_path / "config.yaml", [top], "--dry-run", "--max-checksum-file-size", "1MB")
    assert re.search(r"^subset\s+1$", plain.stdout, re.MULTILINE), plain.stdout[-2000:]
