"""Popularity scorers: how well-known each fact's subject is (the paper's ranking signal).

A scorer is `fn(facts, params, context) -> pd.Series` (numbers aligned with `facts`); `params`
is the dataset's `popularity` config block. Adding a scorer = one function + its SCORERS entry
(a Scorer: what the config check, the download, the rules and the figures must know of it) + its
name in the schema's `popularity.scorer` enum + its sentence in the popularity figure's caption
(report/accuracy_vs_popularity.rst, which names an unknown scorer as such).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from factft.errors import FactftError
from factft.tables import check_facts, drop_invalid, read_table

log = logging.getLogger(__name__)


@dataclass
class ScoringContext:
    """What scorers need beyond the facts and their config block."""

    dataset: str
    fmt: str = "open"
    prompt: dict | None = None  # config prompt block, for model_confidence
    model: dict | None = None  # model_spec of the scoring model, for model_confidence
    pageviews: str | Path | None = None  # table written by the `pageviews` rule
    batch_size: int = 16  # rows per forward pass of model_confidence (evaluate.batch_size)
    choice_score: str = "sum"  # multiple choice: as evaluation picks a choice (evaluate.choice_score)


def column(facts: pd.DataFrame, params: dict, context: ScoringContext) -> pd.Series:
    """A numeric column of the source (e.g. PopQA's s_pop, monthly page views)."""
    name = params["column"]
    if name not in facts.columns:
        raise FactftError(
            f"dataset '{context.dataset}': column '{name}' named in popularity.column is missing; "
            f"columns are: {list(facts.columns)}"
        )
    return facts[name]


def pageviews(facts: pd.DataFrame, params: dict, context: ScoringContext) -> pd.Series:
    """The subject's Wikipedia page views, from the table the `pageviews` rule fetched."""
    from factft.pageviews import fact_articles  # requests: the figures' env, which reads SCORERS, has none

    if context.pageviews is None:
        raise FactftError(
            f"dataset '{context.dataset}': scorer pageviews needs the page-view table; "
            "run the `pageviews` rule (or factft.pageviews.pageview_table) first"
        )
    views = read_table(context.pageviews).set_index("article")["views"]
    return fact_articles(facts, params, context.dataset).map(views)


def model_confidence(facts: pd.DataFrame, params: dict, context: ScoringContext) -> pd.Series:
    """The scoring model's probability of the gold answer under a few-shot prompt."""
    from factft.confidence import model_confidence_scores  # torch: imported only when used

    if context.model is None:
        raise FactftError(f"dataset '{context.dataset}': scorer model_confidence needs popularity.model")
    return model_confidence_scores(
        facts,
        context.model,
        params["shots"],
        context.prompt,
        context.fmt,
        batch_size=context.batch_size,
        choice_score=context.choice_score,
    )


def pretraining_count(facts: pd.DataFrame, params: dict, context: ScoringContext) -> pd.Series:
    """Exact mentions of the fact in the pretraining corpus (synthetic worlds write them)."""
    if "mentions" not in facts.columns:
        raise FactftError(
            f"dataset '{context.dataset}': scorer pretraining_count needs a 'mentions' column, which "
            f"synthetic worlds write; columns are: {list(facts.columns)}"
        )
    return facts["mentions"]


@dataclass(frozen=True)
class Scorer:
    """A scorer and what the workflow must know of it."""

    score: Callable[[pd.DataFrame, dict, ScoringContext], pd.Series]
    # The popularity keys it reads besides `scorer` (the page-view request rate is how fast,
    # not what): a job's params hold only these, so another scorer's setting (page-view dates
    # on a column-scored dataset) changes nothing it computed.
    settings: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # keys the config check demands
    source_column: str | None = None  # the key naming a source column it reads: kept at download
    needs_model: bool = False  # a model's confidence ranks: the model is part of the results path
    needs_pageviews: bool = False  # reads the table the `pageviews` rule fetches
    synthetic_only: bool = False  # reads the statement counts a synthetic world writes
    # The `popularity_source` label after the scorer's name: what determines its numbers.
    label: Callable[[dict], str] | None = None
    # What the figures call its ranking, and its first facts.
    ranking: tuple[str, str] = ("popularity", "most popular")


def _pageviews_label(params: dict) -> str:
    label = f"{params.get('project', 'en.wikipedia')}:{params.get('start')}-{params.get('end')}"
    return label if params.get("follow_redirects", True) else f"{label}:titles-as-given"


SCORERS = {
    "column": Scorer(
        column, settings=("column",), required=("column",), source_column="column", label=lambda p: p["column"]
    ),
    "pageviews": Scorer(
        pageviews, settings=("project", "start", "end", "title_column", "follow_redirects"),
        source_column="title_column", needs_pageviews=True, label=_pageviews_label,
    ),  # fmt: skip
    "model_confidence": Scorer(
        model_confidence, settings=("model", "shots"), needs_model=True,
        label=lambda p: f"{p['model']}:{p.get('shots')}-shot", ranking=("model confidence", "most confidently known"),
    ),  # fmt: skip
    "pretraining_count": Scorer(pretraining_count, synthetic_only=True),
}
# The popularity keys that loading a dataset reads: other keys (page-view dates) leave the download alone.
DOWNLOAD_READS = ("scorer", *sorted({s.source_column for s in SCORERS.values() if s.source_column}))


def describe(params: dict) -> str:
    """The `popularity_source` label: scorer plus what determines its numbers."""
    name = params["scorer"]
    label = SCORERS[name].label if name in SCORERS else None
    return f"{name}:{label(params)}" if label else name


def add_popularity(
    raw: pd.DataFrame, params: dict, context: ScoringContext, max_drop_fraction: float
) -> pd.DataFrame:
    """The facts table: `raw` with `popularity` (float64, finite, >= 0) and `popularity_source`.

    Rows whose score is missing, non-numeric, infinite or negative are dropped and counted;
    more than `max_drop_fraction` of them is an error.
    """
    scorer = params["scorer"]
    if scorer not in SCORERS:
        raise FactftError(
            f"dataset '{context.dataset}': popularity.scorer '{scorer}' is unknown; "
            f"scorers are: {sorted(SCORERS)}"
        )
    where = f"dataset '{context.dataset}' (popularity {describe(params)})"
    facts = raw.reset_index(drop=True)
    scores = pd.to_numeric(SCORERS[scorer].score(facts, params, context), errors="coerce").astype("float64")
    facts["popularity"] = scores.reindex(facts.index)
    facts["popularity_source"] = describe(params)
    finite = facts["popularity"].map(math.isfinite)
    facts = drop_invalid(
        facts,
        {
            "popularity missing or not a number": ~finite,
            "negative popularity (a count or rate, >= 0: not its logarithm)": finite & (facts["popularity"] < 0),
        },
        where,
        max_drop_fraction,
    ).reset_index(drop=True)
    check_facts(facts, where)
    log.info(
        "%s: popularity min %.4g, median %.4g, max %.4g",
        where,
        facts["popularity"].min(),
        float(np.median(facts["popularity"])),
        facts["popularity"].max(),
    )
    return facts
