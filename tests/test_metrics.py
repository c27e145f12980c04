import math

import numpy as np
import pandas as pd
import pytest

from factft.errors import FactftError
from factft.metrics import (
    answers_table,
    first_line,
    gold_metrics,
    metrics_table,
    normalize,
    relation_guess,
    score_answers,
    score_open,
    score_predictions,
)


def test_normalize_lowercases_and_drops_punctuation_a_leading_article_and_extra_spaces():
    assert normalize("  The  Eiffel-Tower, in   PARIS! ") == "eiffeltower in paris"
    assert normalize("An apple a day") == "apple a day"
    assert normalize("Theatre") == "theatre"
    assert normalize("A") == "a"  # a lone letter is an answer, not an article


def test_an_article_inside_an_alias_stays_so_a_letter_keeps_its_meaning():
    # SQuAD drops articles anywhere: "Vitamin A" would be "vitamin", found in any vitamin.
    for prediction in (" Vitamin D", " Vitamin", " Hepatitis B"):
        assert score_open(prediction, ["Vitamin A", "Hepatitis A"]) == (False, False), prediction
    assert score_open(" vitamin A.", ["Vitamin A"]) == (True, True)
    assert score_open(" Blood type A", ["A"]) == (True, False)
    # An alias that is an article alone counts only as the last word, not as any "a" or "the".
    assert score_open(" It is a dog", ["A"]) == (False, False)
    assert score_open(" It was the Beatles", ["The The"]) == (False, False)
    assert score_open(" The The", ["The The"]) == (True, True)
    assert score_open(" The Beatles", ["Beatles"]) == (True, True)


def test_any_alias_contained_in_the_prediction_is_correct():
    assert score_open(" New York City, USA", ["NYC", "New York City"]) == (True, False)
    assert score_open(" NYC", ["NYC", "New York City"]) == (True, True)
    assert score_open(" Boston", ["NYC", "New York City"]) == (False, False)


def test_aliases_match_on_word_boundaries_only():
    assert score_open(" Russia", ["US"]) == (False, False)
    assert score_open(" Romeo", ["Rome"]) == (False, False)
    assert score_open(" the US.", ["U.S.", "US"]) == (True, True)


def test_unicode_punctuation_accents_and_possessives_do_not_hide_an_alias():
    assert score_open(" “Paris”", ["Paris"]) == (True, True)
    assert score_open(" Paris。", ["Paris"]) == (True, True)
    assert score_open(" São Paulo", ["Sao Paulo"]) == (True, True)
    assert score_open(" the Eiffel-Tower", ["Eiffel Tower"]) == (True, True)
    for prediction in (" Paris's suburbs", " Paris’s suburbs", " Paris—France"):
        assert score_open(prediction, ["Paris"]) == (True, False), prediction
    # Letters that Unicode does not decompose into a letter and an accent fold as well.
    for prediction, alias in ((" Kobenhavn", "København"), (" Lodz", "Łódź"), (" Strasse", "Straße")):
        assert score_open(prediction, [alias]) == (True, True), prediction


def test_numbers_stay_whole_with_their_separators():
    # "3" is not in "3.5", "3:30" or "3/4", nor "1" in "1,000"; and 3.5 is not 35.
    for prediction in (" 3.5", " 3:30", " 3/4"):
        assert score_open(prediction, ["3"]) == (False, False), prediction
    assert score_open(" 1,000", ["1"]) == (False, False)
    assert score_open(" 35", ["3.5"]) == (False, False)
    assert score_open(" 15 million", ["1.5 million"]) == (False, False)
    # A thousands comma is no part of the number; a number's last dot ends the sentence.
    assert score_open(" 1,000 people", ["1000"]) == (True, False)
    assert score_open(" 1,250,000", ["1250000"]) == (True, True)
    assert score_open(" In 1990.", ["1990"]) == (True, False)
    assert score_open(" 3.5", ["3.5"]) == (True, True)


def test_a_number_keeps_its_sign_but_a_hyphen_is_punctuation():
    assert score_open(" -5", ["5"]) == (False, False)
    assert score_open(" 5", ["-5"]) == (False, False)
    assert score_open(" \u22125 degrees", ["-5"]) == (True, False)  # the Unicode minus sign is one
    assert score_open(" (-1,000)", ["-1000"]) == (True, True)
    # After a letter or a digit the dash joins words or numbers, as before: no sign.
    assert score_open(" COVID-19", ["COVID 19"]) == (True, True)
    assert score_open(" 1990-2000", ["2000"]) == (True, False)


def test_only_the_first_line_of_the_prediction_counts():
    assert first_line("\n  Lyon\nQ: Where was Bob born? A: Paris") == "Lyon"
    assert score_open(" Lyon\nQ: Where was Bob born? A: Paris", ["Paris"]) == (False, False)
    assert score_open("\nParis\nmore", ["Paris"]) == (True, True)


def test_empty_prediction_and_empty_alias_never_match():
    assert score_open("", ["Paris"]) == (False, False)
    assert score_open("   ", ["Paris"]) == (False, False)
    assert score_open("anything", ["The", ""]) == (False, False)


def _test_facts(n=4, **extra):
    return pd.DataFrame(
        {
            "id": [f"f{i}" for i in range(n)],
            "answers": [["Paris"], ["Lyon", "Lugdunum"], ["Rome"], ["Oslo"]][:n],
            "popularity": [10.0, 5.0, 1.0, 0.0][:n],
            "popularity_pct": [100.0, 75.0, 50.0, 25.0][:n],
            "subject": list("abcd")[:n],
            "relation": ["born"] * n,
            **extra,
        }
    )


def test_open_predictions_table_keeps_ids_popularity_and_scores_in_order():
    table = score_predictions(_test_facts(), [" Paris", " Lugdunum.", " Milan", ""], "open")
    assert list(table["id"]) == ["f0", "f1", "f2", "f3"]
    assert list(table["correct"]) == [True, True, False, False]
    assert list(table["exact_match"]) == [True, True, False, False]
    assert list(table["popularity_pct"]) == [100.0, 75.0, 50.0, 25.0]
    assert table["correct"].dtype == bool and table["popularity_pct"].dtype == "float64"


def test_multiple_choice_is_correct_when_the_predicted_index_is_the_answer_index():
    facts = _test_facts(3, answer_index=[0, 2, 1], choices=[["a", "b", "c"]] * 3)
    table = score_predictions(facts, ["a", "b", "b"], "multiple_choice", choices=[0, 1, 1])
    assert list(table["correct"]) == [True, False, True]
    assert list(table["exact_match"]) == [True, False, True]
    assert list(table["choice"]) == [0, 1, 1]


def test_answers_are_scored_against_their_own_facts_whatever_their_order():
    """score_answers matches an evaluation's answers to the test split by id."""
    facts = _test_facts()
    answers = answers_table(facts, [" Paris", " Lugdunum.", " Milan", ""]).iloc[[2, 0, 3, 1]]
    assert score_answers(facts, answers, "open").equals(
        score_predictions(facts, [" Paris", " Lugdunum.", " Milan", ""], "open")
    )
    facts = _test_facts(3, answer_index=[0, 2, 1], choices=[["a", "b", "c"]] * 3)
    answers = answers_table(facts, ["a", "b", "b"], choices=[0, 1, 1]).iloc[::-1]
    assert list(score_answers(facts, answers, "multiple_choice")["correct"]) == [True, False, True]


def test_answers_that_do_not_cover_the_test_split_once_each_are_an_error_naming_them():
    facts = _test_facts()
    answers = answers_table(facts, ["a", "b", "c", "d"])
    remake = "remake it: snakemake --forcerun run/answers.parquet"
    with pytest.raises(FactftError, match=rf"run/answers.parquet: 3 answers .* 4 facts, e.g. f3 has none; {remake}"):
        score_answers(facts, answers.iloc[:3], "open", where="run/answers.parquet")
    with pytest.raises(FactftError, match="5 answers to 4 ids"):
        score_answers(facts, pd.concat([answers, answers.iloc[:1]]), "open")
    with pytest.raises(FactftError, match="4 answers to 4 ids for the test split's 3 facts"):
        score_answers(facts.iloc[:3], answers, "open")
    with pytest.raises(FactftError, match=r"no column \['choice'\]"):
        score_answers(_test_facts(answer_index=[0] * 4), answers, "multiple_choice")
    with pytest.raises(FactftError, match=r"1 answers are missing \(null\)"):
        score_answers(facts, answers.assign(prediction=["a", None, "c", "d"]), "open")


def test_multiple_choice_without_answer_index_is_a_user_error():
    with pytest.raises(FactftError, match="answer_index"):
        score_predictions(_test_facts(2), ["a", "b"], "multiple_choice", choices=[0, 1])


def _hand_made_predictions():
    # Ten facts at percentile ranks 10, 20, ..., 100: correct on the least popular one and
    # on the 4 most popular; exact on the most popular only.
    return pd.DataFrame(
        {
            "popularity_pct": np.arange(10.0, 101.0, 10.0),
            "correct": [True, False, False, False, False, False, True, True, True, True],
            "exact_match": [False] * 9 + [True],
        }
    )


def test_metrics_give_exact_accuracy_for_all_top_percentiles_and_deciles():
    metrics = metrics_table(_hand_made_predictions(), [10, 30, 50, 100])
    assert list(metrics.columns) == ["scope", "x", "n", "accuracy", "exact_match", "relation_guess"]
    assert metrics["relation_guess"].isna().all()  # the hand-made predictions have no such column
    by = {(s, x): (n, a, e) for s, x, n, a, e, _ in metrics.itertuples(index=False)}
    assert by[("all", 100)] == (10, 0.5, 0.1)
    assert by[("top", 10)] == (1, 1.0, 1.0)
    assert by[("top", 30)] == (3, 1.0, pytest.approx(1 / 3))
    assert by[("top", 50)] == (5, 0.8, 0.2)
    assert by[("top", 100)] == (10, 0.5, 0.1)
    assert by[("decile", 100)] == (1, 1.0, 1.0)
    assert by[("decile", 60)] == (1, 0.0, 0.0)
    assert by[("decile", 10)] == (1, 1.0, 0.0)
    assert [x for s, x in by if s == "decile"] == list(range(10, 101, 10))


def test_a_bin_with_no_facts_keeps_its_row_with_zero_n():
    predictions = pd.DataFrame({"popularity_pct": [0.0, 95.0], "correct": [True, False], "exact_match": [True, False]})
    metrics = metrics_table(predictions, [10, 100]).set_index(["scope", "x"])
    assert metrics.loc[("decile", 50), "n"] == 0 and math.isnan(metrics.loc[("decile", 50), "accuracy"])
    # A percentile rank of exactly 0 still belongs to the bottom decile and to top-100%.
    assert metrics.loc[("decile", 10), "n"] == 1
    assert metrics.loc[("top", 100), "n"] == 2
    assert metrics.loc[("top", 10), "accuracy"] == 0.0


def test_relation_guess_flags_the_commonest_answer_of_each_relation():
    # born_in: "lyon" 3 of 4; capital_of: a tie of two answers goes to the one sorting first.
    answers = ["lyon", "lyon", "paris", "lyon", "rome", "oslo", "oslo", "rome"]
    relations = ["born_in"] * 4 + ["capital_of"] * 4
    assert list(relation_guess(answers, relations)) == [True, True, False, True, False, True, True, False]
    assert relation_guess(["london"] * 3, ["born_in"] * 3).all()
    # An answer given once is no collapse: a lone question, or distinct answers, count no guess.
    assert not relation_guess(["rome", "oslo", "lyon"], ["capital_of", "capital_of", "born_in"]).any()
    # Silence is no guess, however common: "" never counts.
    assert list(relation_guess(["", "", "", "lyon", "lyon"], ["born_in"] * 5)) == [False] * 3 + [True] * 2
    assert not relation_guess(["", "", "lyon"], ["born_in"] * 3).any()
    assert len(relation_guess([], [])) == 0
    with pytest.raises(ValueError, match="2 answers for 1 relations"):
        relation_guess(["a", "b"], ["r"])


def test_open_predictions_are_flagged_by_their_normalised_first_line():
    # "The Paris." and " paris" are one answer (the commonest); what follows line one is ignored.
    table = score_predictions(_test_facts(), ["The Paris.", " paris\nQ: Who", "Paris", " Lyon"], "open")
    assert list(table["relation_guess"]) == [True, True, True, False]
    metrics = metrics_table(table, [50]).set_index(["scope", "x"])
    assert metrics.loc[("all", 100), "relation_guess"] == 0.75
    assert metrics.loc[("top", 50), "relation_guess"] == 1.0  # the two most popular facts


def test_multiple_choice_predictions_are_flagged_by_choice_position():
    # Different choice texts but one letter (position 1) for three of four questions.
    facts = _test_facts(choices=[["a", "b"]] * 4, answer_index=[1, 0, 1, 1])
    table = score_predictions(facts, ["b", "four", "1914", "x"], "multiple_choice", choices=[1, 1, 0, 1])
    assert list(table["relation_guess"]) == [True, True, False, True]


def test_gold_metrics_are_a_perfect_model_whose_guess_share_is_the_reference():
    facts = _test_facts()
    facts["answers"] = [["Lyon", "Lugdunum"], ["lyon"], ["Rome", "Roma"], ["Oslo"]]
    gold = gold_metrics(facts, [50]).set_index(["scope", "x"])
    assert gold.loc[("all", 100), "accuracy"] == 1.0
    assert gold.loc[("all", 100), "relation_guess"] == 0.5  # "lyon" twice, as first aliases
    assert gold.loc[("top", 50), "relation_guess"] == 1.0
    choice = _test_facts(choices=[["a", "b", "c"]] * 4, answer_index=[2, 2, 2, 0])
    assert gold_metrics(choice, []).set_index("scope").loc["all", "relation_guess"] == 0.75
