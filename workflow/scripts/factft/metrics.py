"""Scoring predictions (PopQA's open-QA metric, multiple choice) and accuracy by popularity.

Open QA follows PopQA: a prediction is correct when a gold alias occurs in it, after the SQuAD
normalisation (lowercase, no punctuation, no leading article, single spaces) made to hold for
any script: accents folded ("São Paulo" is "sao paulo", "Łódź" "lodz"), every Unicode
punctuation mark dropped (curly quotes, dashes, "。") but a number's sign and separators ("3.5"
is neither "35" nor holds "3"; "1,000" is "1000"; "-5" is not "5"). SQuAD drops articles
anywhere, which is harmless for its exact match but not for containment: "Vitamin A" would be
"vitamin", found in "Vitamin D"; so only an article that opens the text goes. Containment is on
word boundaries, checked with punctuation dropped ("U.S." is "us") and with it read as a space
("Paris's", "Paris—France" hold "paris"), correct if either holds. Only the first line counts:
a base model keeps generating the next "Q: ... A: ..." pair, and an answer to that invented
question must not score.

Each prediction is also flagged `relation_guess` when it is the commonest answer of its
relation in the run: the paper's mechanism seen in the answers. A model that learned to
ignore the subject answers from the relation alone, so its answers to one relation collapse
onto a few values ("Where was X born?" -> "London" for every X). The share of such answers
needs no attention maps, so it works for every model and dataset; the gold answers' own
share (gold_metrics) is the reference: what a perfect model would show. Open QA
compares normalised first lines, multiple choice the choice positions (a collapsed model
picks one letter whatever the question).
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from factft.errors import FactftError

log = logging.getLogger(__name__)

# An article opening the text, with a word after it: a lone "A" is an answer (a blood type).
_ARTICLE_WORDS = ("a", "an", "the")
_LEADING_ARTICLE = re.compile(rf"^(?:{'|'.join(_ARTICLE_WORDS)}) (?=\S)")
# A number stays one word with its sign and separators, which are not punctuation there: "3" is
# not in "3.5" or "3:30", "3.5" is not "35", "5" not "-5" (a minus after a letter or digit is a
# hyphen: "COVID-19", "1990-2000"). A thousands comma alone goes: "1,000" is "1000".
_NUMBER = re.compile(r"((?:(?<!\w)[-\u2212])?\d+(?:[.,:/]\d+)+|(?<!\w)[-\u2212]\d+)")
_THOUSANDS = re.compile(r",(?=\d{3}(?!\d))")
# Letters that are not an accented letter to Unicode, so NFKD leaves them whole ("ß" casefolds).
_LETTERS = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"})

FORMATS = ("open", "multiple_choice")  # how a dataset is asked, and so scored
METRICS_COLUMNS = ("scope", "x", "n", "accuracy", "exact_match", "relation_guess")
DECILES = tuple(range(10, 101, 10))


def normalize(text: str, punctuation: str = "") -> str:
    """SQuAD's answer normalisation, accents folded (letters such as "ø" and "ß" too) and every
    Unicode punctuation mark (and ASCII's symbols, as SQuAD) replaced by `punctuation`, except
    a number's sign and separators; of the articles only one opening the text goes."""
    folded = unicodedata.normalize("NFKD", text.casefold().translate(_LETTERS))
    # re.split with a group: numbers at the odd places, the text around them at the even ones.
    pieces = _NUMBER.split(folded)
    text = "".join(
        _THOUSANDS.sub("", piece).replace("\u2212", "-")
        if i % 2
        else "".join(punctuation if _is_punctuation(c) else c for c in piece if not unicodedata.combining(c))
        for i, piece in enumerate(pieces)
    )
    return _LEADING_ARTICLE.sub("", " ".join(text.split()))


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def first_line(prediction: str) -> str:
    """The prediction up to its first line break (leading whitespace and blank lines skipped)."""
    return prediction.lstrip().split("\n", 1)[0]


def score_open(prediction: str, answers: Iterable[str]) -> tuple[bool, bool]:
    """(correct, exact_match) of one open-QA prediction against its gold aliases.

    Containment is checked on word boundaries: "us" must not match inside "russia", nor
    "rome" inside "romeo"; punctuation dropped or read as a space (see the module doc).
    Aliases that normalise to nothing (e.g. "?") never match, and one that is an article alone
    (the letter "A", the band "The The") only as the prediction's last word: "Blood type A"
    holds "a", "It is a dog" does not.
    """
    line = first_line(prediction)
    answers = [str(answer) for answer in answers]  # read once per punctuation pass
    correct = exact = False
    for punctuation in ("", " "):
        predicted = normalize(line, punctuation)
        aliases = [a for a in (normalize(answer, punctuation) for answer in answers) if a]
        correct = correct or any(_holds(predicted, alias) for alias in aliases)
        exact = exact or any(alias == predicted for alias in aliases)
    return correct, exact


def _holds(predicted: str, alias: str) -> bool:
    if alias in _ARTICLE_WORDS:
        return f" {predicted}".endswith(f" {alias}")
    return f" {alias} " in f" {predicted} "


def relation_guess(answers: Sequence, relations: Sequence) -> np.ndarray:
    """Per question, whether its answer is the commonest answer of its relation.

    The commonest answer of a relation is the one given most often (a tie goes to the answer
    that sorts first), so the share of True is the sum over relations of the commonest
    answer's count over the number of questions. An answer given once is no collapse: without
    that rule a relation with one test question, or with all answers distinct, would count one
    guess, which inflates the share on small test sets. An empty answer is no answer, never a
    guess: a model that stays silent is not guessing from the relation.
    """
    if len(answers) != len(relations):
        raise ValueError(f"{len(answers)} answers for {len(relations)} relations")
    table = pd.DataFrame({"relation": np.asarray(relations), "answer": np.asarray(answers)})
    answered = table[table["answer"].astype(str) != ""]
    counts = answered.value_counts(["relation", "answer"]).rename("count").reset_index()
    counts = counts[counts["count"] > 1]
    counts = counts.sort_values(["relation", "count", "answer"], ascending=[True, False, True])
    commonest = counts.drop_duplicates("relation").set_index("relation")["answer"]
    return (table["answer"] == table["relation"].map(commonest)).to_numpy(dtype=bool)


def score_predictions(
    test: pd.DataFrame, predictions: Sequence[str], fmt: str, choices: Sequence[int] | None = None
) -> pd.DataFrame:
    """The predictions table: id, prediction, correct, exact_match, the test facts' popularity,
    subject and relation, relation_guess, and for multiple choice the picked choice.

    `predictions` are generated texts aligned with `test`'s rows; for multiple choice,
    `choices` are the predicted choice indices (then `predictions` are those choices' texts).
    """
    if len(predictions) != len(test):
        raise ValueError(f"{len(predictions)} predictions for {len(test)} test facts")
    if fmt == "open":
        scores = [score_open(p, a) for p, a in zip(predictions, test["answers"])]
        correct = [c for c, _ in scores]
        exact = [e for _, e in scores]
        answers = [normalize(first_line(p)) for p in predictions]
    elif fmt == "multiple_choice":
        if choices is None or "answer_index" not in test.columns:
            raise FactftError(
                "multiple choice scoring needs predicted choice indices and the test set's answer_index column"
            )
        correct = list(np.asarray(choices) == test["answer_index"].to_numpy())
        exact = correct
        answers = np.asarray(choices, dtype="int64")
    else:
        raise FactftError(f"format '{fmt}': unknown; formats are {', '.join(FORMATS)}")
    table = pd.DataFrame(
        {
            "id": test["id"].astype(str).to_numpy(),
            "prediction": [str(p) for p in predictions],
            "correct": np.asarray(correct, dtype=bool),
            "exact_match": np.asarray(exact, dtype=bool),
            "popularity_pct": test["popularity_pct"].astype("float64").to_numpy(),
            "popularity": test["popularity"].astype("float64").to_numpy(),
            "subject": test["subject"].astype(str).to_numpy(),
            "relation": test["relation"].astype(str).to_numpy(),
            "relation_guess": relation_guess(answers, test["relation"].astype(str).to_numpy()),
        }
    )
    if choices is not None:
        table["choice"] = np.asarray(choices, dtype="int64")
    return table


def answers_table(test: pd.DataFrame, predictions: Sequence[str], choices: Sequence[int] | None = None) -> pd.DataFrame:
    """What an evaluation writes (answers.parquet): per test fact its id and the model's raw
    answer, and for multiple choice the picked choice's index. Scoring is a job of its own
    (score_answers), so that a scoring fix reruns no model."""
    if len(predictions) != len(test):
        raise ValueError(f"{len(predictions)} predictions for {len(test)} test facts")
    table = pd.DataFrame({"id": test["id"].astype(str).to_numpy(), "prediction": [str(p) for p in predictions]})
    if choices is not None:
        table["choice"] = np.asarray(choices, dtype="int64")
    return table


def score_answers(test: pd.DataFrame, answers: pd.DataFrame, fmt: str, where: str = "the answers") -> pd.DataFrame:
    """The predictions table (score_predictions) of an evaluation's `answers` (answers_table)
    on the `test` facts it answered, matched by id. `where` names the answers in errors."""
    needed = ["id", "prediction", *(["choice"] if fmt == "multiple_choice" else [])]
    remake = f"remake it: snakemake --forcerun {where} (with the run's options)"
    missing = [c for c in needed if c not in answers.columns]
    if missing:
        raise FactftError(f"{where}: no column {missing}; {remake}")
    if answers["prediction"].isna().any():
        raise FactftError(f"{where}: {int(answers['prediction'].isna().sum())} answers are missing (null); {remake}")
    by_id = answers.assign(id=answers["id"].astype(str)).drop_duplicates("id").set_index("id")
    ids = test["id"].astype(str)
    absent = ids[~ids.isin(by_id.index)]
    if len(absent) or len(by_id) != len(answers) or len(by_id) != len(ids):
        example = f", e.g. {absent.iloc[0]} has none" if len(absent) else ""
        raise FactftError(
            f"{where}: {len(answers)} answers to {answers['id'].nunique()} ids for the test split's "
            f"{len(test)} facts{example}; {remake}"
        )
    aligned = by_id.loc[ids]
    choices = aligned["choice"].to_numpy() if fmt == "multiple_choice" else None
    table = score_predictions(test, aligned["prediction"].tolist(), fmt, choices=choices)
    log.info(
        "%s: %d answers, accuracy %.4f, exact match %.4f",
        where,
        len(table),
        table["correct"].mean(),
        table["exact_match"].mean(),
    )
    return table


def metrics_table(predictions: pd.DataFrame, percentiles: Sequence[float]) -> pd.DataFrame:
    """Accuracy (and the relation_guess share) overall, on the top-x% most popular facts,
    and per popularity decile.

    popularity_pct is a percentile rank in (0, 100], 100 = most popular. scope "top", x:
    rows with popularity_pct > 100 - x (accuracy by popularity, as the paper plots it); scope "decile", x:
    rows with x - 10 < popularity_pct <= x (decile 100 = the most popular tenth). A
    percentile of exactly 0 is counted in top-100 and decile 10, so no row falls outside.
    Empty bins keep their row with n = 0 and NaN accuracy, so every table has the same rows.
    relation_guess is NaN where `predictions` has no such column.
    """
    pct = predictions["popularity_pct"].to_numpy(dtype="float64")
    rows = [_row("all", 100, np.ones(len(pct), dtype=bool), predictions)]
    for x in percentiles:
        rows.append(_row("top", x, (pct > 100 - x) | (x >= 100), predictions))
    for x in DECILES:
        above = (pct > x - 10) | (x == DECILES[0])
        rows.append(_row("decile", x, above & (pct <= x), predictions))
    return pd.DataFrame(rows, columns=list(METRICS_COLUMNS))


def _row(scope: str, x: float, mask: np.ndarray, predictions: pd.DataFrame) -> tuple:
    n = int(mask.sum())
    if n == 0:
        return scope, x, 0, float("nan"), float("nan"), float("nan")

    def share(column: str) -> float:
        return float(predictions[column].to_numpy(dtype=bool)[mask].mean())

    guess = share("relation_guess") if "relation_guess" in predictions.columns else float("nan")
    return scope, x, n, share("correct"), share("exact_match"), guess


def gold_metrics(test: pd.DataFrame, percentiles: Sequence[float]) -> pd.DataFrame:
    """metrics_table of a perfect model on `test`: it answers every fact's gold answer (the
    first alias, or answer_index), so its relation_guess is the reference for a model's.
    """
    if "answer_index" in test.columns:
        gold = test["answer_index"].to_numpy(dtype="int64")
    else:
        gold = [normalize(str(aliases[0])) for aliases in test["answers"]]
    perfect = pd.DataFrame(
        {
            "correct": True,
            "exact_match": True,
            "relation_guess": relation_guess(gold, test["relation"].astype(str).to_numpy()),
            "popularity_pct": test["popularity_pct"].astype("float64").to_numpy(),
        }
    )
    return metrics_table(perfect, percentiles)
