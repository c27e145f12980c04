"""The synthetic world: exact Zipf popularity, a corpus that matches the counts, seeded."""

from collections import Counter

import numpy as np
import pytest

from factft.errors import FactftError
from factft.tables import read_table
from factft.world import RELATIONS, generate_world, read_corpus, subject_mentions, write_world

SMALL = dict(
    subjects=60, relations=3, answers_per_relation=10, zipf=1.0, mentions=3000, min_mentions=2, seed=0
)


@pytest.fixture(scope="module")
def world():
    return generate_world(**SMALL)


@pytest.mark.parametrize("zipf", [0.8, 1.0, 1.5])
def test_subject_mentions_fall_with_rank_on_a_log_log_slope_of_minus_zipf(zipf):
    counts = subject_mentions(300, zipf, 200_000, floor=0)
    assert counts.sum() == 200_000
    assert (np.diff(counts) <= 0).all()
    head = counts > 20  # rounding dominates the tail's shape, not the law
    slope = np.polyfit(np.log(np.arange(1, 301)[head]), np.log(counts[head]), 1)[0]
    assert slope == pytest.approx(-zipf, abs=0.05)


def test_subject_mentions_raise_the_tail_to_the_floor_and_keep_the_total():
    counts = subject_mentions(1000, 1.0, 40_000, floor=6)
    assert counts.sum() == 40_000
    assert counts.min() == 6
    assert (np.diff(counts) <= 0).all()
    # The head keeps the pure law: the second subject has half the first's mentions.
    assert counts[1] / counts[0] == pytest.approx(0.5, abs=0.01)


def test_mention_counts_equal_the_statements_in_the_corpus(world):
    lines = Counter(world.corpus)
    facts = world.facts
    for fact in facts.itertuples():
        line = f"{fact.statement} {fact.answers[0]}."
        assert lines.pop(line, 0) == fact.mentions
    assert not lines, "the corpus states only the world's facts"
    assert len(world.corpus) == SMALL["mentions"] == facts["mentions"].sum()
    assert facts["mentions"].min() >= SMALL["min_mentions"]


def test_facts_of_popular_subjects_are_mentioned_more(world):
    per_subject = world.facts.groupby("subject", sort=False)["mentions"].sum().to_numpy()
    assert (np.diff(per_subject) <= 0).all()
    assert per_subject[0] > 10 * per_subject[-1]


def test_world_is_deterministic_for_a_seed_and_differs_across_seeds(world):
    again = generate_world(**SMALL)
    assert again.corpus == world.corpus
    assert again.facts.equals(world.facts)
    other = generate_world(**dict(SMALL, seed=1))
    assert other.corpus != world.corpus
    assert set(other.facts["subject"]) != set(world.facts["subject"])


def test_raw_table_meets_the_facts_contract_after_a_round_trip(world, tmp_path):
    write_world(world, tmp_path / "raw.parquet", tmp_path / "corpus.txt")
    facts = read_table(tmp_path / "raw.parquet")
    assert list(facts.columns) == [
        "id",
        "question",
        "answers",
        "subject",
        "relation",
        "mentions",
        "statement",
    ]
    assert facts["id"].is_unique
    assert len(facts) == SMALL["subjects"] * SMALL["relations"]
    assert str(facts["mentions"].dtype) == "int64"
    assert all(len(answers) == 1 for answers in facts["answers"])
    assert read_corpus(tmp_path / "corpus.txt") == world.corpus


def test_subjects_have_distinct_two_word_made_up_names(world):
    names = world.facts["subject"].unique()
    assert len(names) == SMALL["subjects"]
    words = [w for name in names for w in name.split()]
    assert all(len(name.split()) == 2 for name in names)
    answers = {a for r in RELATIONS for a in r.answers}
    assert not answers & set(words)


def test_questions_and_statements_name_the_subject_and_statements_stop_before_the_answer(world):
    for fact in world.facts.itertuples():
        assert fact.subject in fact.question and fact.question.endswith("?")
        assert fact.statement.startswith(fact.subject)
        assert fact.answers[0] not in fact.statement


def test_answers_are_skewed_so_a_most_common_guess_exists():
    facts = generate_world(**dict(SMALL, subjects=400, answers_per_relation=30)).facts
    for _, answers in facts.groupby("relation")["answers"]:
        top_share = answers.str[0].value_counts(normalize=True).iloc[0]
        assert top_share > 3 / 30


def test_answer_pools_beyond_the_built_in_words_are_filled_with_made_up_single_words():
    facts = generate_world(
        **dict(SMALL, subjects=400, relations=2, answers_per_relation=40, answer_zipf=0.0)
    ).facts
    for _, answers in facts.groupby("relation")["answers"]:
        distinct = set(answers.str[0])
        assert len(distinct) == 40
        assert all(len(a.split()) == 1 and a.isalpha() for a in distinct)


def test_built_in_relations_have_distinct_single_word_answers_and_cloze_ready_templates():
    assert len(RELATIONS) == 12
    answers = [a for r in RELATIONS for a in r.answers]
    assert len(answers) == len(set(answers))
    for relation in RELATIONS:
        assert len(relation.answers) >= 30
        assert relation.statement.endswith("{a}.") and "{s}" in relation.question


def test_too_few_mentions_for_min_mentions_names_the_keys():
    with pytest.raises(FactftError, match="mentions.*min_mentions"):
        generate_world(**dict(SMALL, mentions=100))


def test_more_relations_than_built_in_is_an_error_listing_them():
    with pytest.raises(FactftError, match="relations: 13.*birthplace"):
        generate_world(**dict(SMALL, relations=13))
