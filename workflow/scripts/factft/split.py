"""Split the facts into a subject-disjoint test set and the finetuning subsets of the pool.

top/bottom = the most/least popular `fraction` of the pool, random = a seeded `fraction`,
whole = the pool. With stratify=relation each subset takes the same number of facts from
every relation, so top, bottom and random differ in popularity, not in relation mix.
A sized subset (top25, bottom10, random25: factft.subsets) is cut from the pool the same
way by sized_subset, a job of its own, so adding one to a grid leaves the others' files alone.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pandas as pd

from factft import subsets
from factft.errors import FactftError

log = logging.getLogger(__name__)

SPLITS = ("top", "bottom", "random", "whole", "test")
STRATIFY = ("relation", "none")


def split_facts(
    facts: pd.DataFrame,
    *,
    dataset: str = "facts",
    fraction: float = 0.5,
    test_fraction: float = 0.3,
    stratify: str = "relation",
    pool_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """The five tables top, bottom, random, whole, test, each with `split` and `popularity_pct`.

    Deterministic: which rows each table gets depends on the facts' content and the seed only,
    never on their row order; every table keeps the facts' row order.
    """
    if stratify not in STRATIFY:
        raise FactftError(f"split.stratify: '{stratify}' is unknown; use one of {list(STRATIFY)}")
    subject_rng, pool_rng, test_rng, random_rng = _streams(seed)[:4]
    facts = facts.reset_index(drop=True)
    # Hashed once here: every table's percentiles and the top/bottom order read it.
    tie = pd.Series(tie_breaks(facts["id"], seed), index=facts.index)

    # Test subjects never appear in finetuning: the experiment measures extraction of facts
    # stored in pretraining, not facts taught by finetuning.
    subjects = np.array(sorted(facts["subject"].unique()), dtype=object)
    if len(subjects) < 2:
        raise FactftError(
            f"dataset '{dataset}': {len(subjects)} subject(s); a subject-disjoint split needs 2 or more"
        )
    n_test = min(max(1, round(test_fraction * len(subjects))), len(subjects) - 1)
    test_subjects = set(subject_rng.permutation(subjects)[:n_test])
    in_test = facts["subject"].isin(test_subjects)
    test = _cap(facts[in_test], test_size, test_rng, f"dataset '{dataset}': split.test_size")
    pool = _cap(facts[~in_test], pool_size, pool_rng, f"dataset '{dataset}': split.pool_size")

    groups = _groups(pool, stratify)
    counts = [_count(fraction, g) for g in groups]
    if sum(counts) == 0:
        raise FactftError(
            f"dataset '{dataset}': split.fraction {fraction} of a pool of {len(pool)} facts{_within(stratify)} leaves "
            "top, bottom and random empty; raise split.fraction or split.pool_size, or use more facts"
        )
    chosen = {"top": [], "bottom": [], "random": []}
    for group, k in zip(groups, counts):
        if k == 0:
            continue
        ranked = _ranked(group, tie)
        chosen["top"].append(ranked[:k])
        chosen["bottom"].append(ranked[::-1][:k])
        by_id = _by_id(group)
        chosen["random"].append(by_id[random_rng.choice(len(by_id), size=k, replace=False)])

    _check_ranking(chosen["top"], chosen["bottom"], pool, dataset)
    log.info(
        "dataset '%s': %d of %d subjects held out; test %d facts, pool %d; top, bottom, random %d each",
        dataset,
        n_test,
        len(subjects),
        len(test),
        len(pool),
        sum(counts),
    )
    tables = {name: facts.loc[sorted(np.concatenate(rows))] for name, rows in chosen.items()}
    tables["whole"] = pool
    tables["test"] = test
    return {name: _finish(tables[name], name, tie) for name in SPLITS}


def sized_subset(
    whole: pd.DataFrame,
    name: str,
    *,
    dataset: str = "facts",
    stratify: str = "relation",
    seed: int = 0,
) -> pd.DataFrame:
    """The sized subset `name` (top25, bottom10, random25) of the pool `whole` (split_facts'
    table), with `split` and `popularity_pct`, selected as split_facts selects top, bottom and
    random: top25 is the head of top's order, bottom likewise from the other end; the sized
    random subsets are heads of one seeded order per relation of their own, so random10 lies
    inside random25 (but not inside random, an independent draw).
    """
    kind, percent = subsets.parse(name)
    if percent is None:
        raise FactftError(f"split: '{name}' is not a sized subset (top<P>, bottom<P>, random<P>)")
    whole = whole.reset_index(drop=True)
    tie = pd.Series(tie_breaks(whole["id"], seed), index=whole.index)
    sized_rng = _streams(seed)[4]
    rows = [np.array([], dtype="int64")]
    for group in _groups(whole, stratify):
        if kind == "random":
            order = _by_id(group)[sized_rng.permutation(len(group))]
        else:
            ranked = _ranked(group, tie)
            order = ranked if kind == "top" else ranked[::-1]
        rows.append(order[: _count(percent / 100, group)])
    chosen = np.concatenate(rows)
    if len(chosen) == 0:
        raise FactftError(
            f"dataset '{dataset}': subset '{name}' ({percent}% of a pool of {len(whole)} facts{_within(stratify)}) "
            "is empty; raise its percent or split.pool_size, or use more facts"
        )
    log.info("dataset '%s': %s takes %d of the pool's %d facts", dataset, name, len(chosen), len(whole))
    return _finish(whole.loc[sorted(chosen)], name, tie)


def _check_ranking(top: list[pd.Index], bottom: list[pd.Index], pool: pd.DataFrame, dataset: str) -> None:
    """FT-Top and FT-Bottom must differ in popularity, not only in the hash that breaks ties:
    an error when each group's facts all have one popularity, a warning when most of FT-Top
    is no more popular than FT-Bottom. (Ties at the boundary are usual: the demo's mention
    counts tie 29% of FT-Top.)"""
    popularity = pool["popularity"]
    if all(popularity[t.union(b)].nunique() <= 1 for t, b in zip(top, bottom)):
        raise FactftError(
            f"dataset '{dataset}': every fact of the pool has the same popularity (e.g. "
            f"{popularity[top[0]].iloc[0]:g}) within its group: FT-Top and FT-Bottom would be random "
            f"halves, not a ranking; check datasets.{dataset}.popularity and the column it scores"
        )
    only_top = [t.difference(b) for t, b in zip(top, bottom)]  # split.fraction above 0.5 shares facts
    tied = sum(int((popularity[t] <= popularity[b].max()).sum()) for t, b in zip(only_top, bottom))
    total = sum(len(t) for t in only_top)
    if tied > total / 2:
        log.warning(
            "dataset '%s': %d of FT-Top's %d facts are no more popular than FT-Bottom's most popular "
            "(ties, ordered by a seeded hash): the two differ less than their names say",
            dataset,
            tied,
            total,
        )


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent streams (subjects, pool cap, test cap, random, sized random), so changing
    one cap or subset does not reshuffle the others."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]


def _groups(pool: pd.DataFrame, stratify: str) -> list[pd.DataFrame]:
    return [g for _, g in pool.groupby("relation", sort=True)] if stratify == "relation" else [pool]


def _within(stratify: str) -> str:
    """How an error names the stratification that made a subset empty."""
    return " within each relation (split.stratify: relation)" if stratify == "relation" else ""


def _count(share: float, group: pd.DataFrame) -> int:
    return math.floor(share * len(group) + 1e-9)


def _ranked(group: pd.DataFrame, tie: pd.Series) -> pd.Index:
    """The group's rows, most popular first. The percentile order breaks ties (seeded, never
    by row order); bottom takes it from the other end, so top and bottom never share a fact."""
    return group.index[np.argsort(-percentiles(group["popularity"], tie[group.index]))]


def _by_id(group: pd.DataFrame) -> pd.Index:
    """The group's rows by id: the order random draws from, whatever the rows' order."""
    return group.sort_values("id", kind="stable").index


def _cap(table: pd.DataFrame, size: int | None, rng: np.random.Generator, key: str) -> pd.DataFrame:
    """A seeded sample of `size` rows (all rows when size is None or larger), in the facts' order."""
    if size is None:
        return table
    if len(table) <= size:
        # One cap serves every dataset, so a cap above a small dataset's size is no mistake.
        log.info("%s %d: all %d facts kept", key, size, len(table))
        return table
    log.info("%s %d: a seeded sample of %d of %d facts", key, size, size, len(table))
    by_id = table.sort_values("id", kind="stable").index
    return table.loc[sorted(by_id[rng.choice(len(by_id), size=size, replace=False)])]


def _finish(table: pd.DataFrame, name: str, tie: pd.Series) -> pd.DataFrame:
    table = table.sort_index()
    pct = percentiles(table["popularity"], tie[table.index])
    table = table.reset_index(drop=True)
    table["split"] = name
    table["popularity_pct"] = pct
    return table


def tie_breaks(ids: pd.Series, seed: int) -> np.ndarray:
    """A seeded hash of each id: the order of facts with equal popularity."""
    return np.array([hashlib.sha256(f"{seed}:{fact}".encode()).hexdigest() for fact in ids], dtype=object)


def percentiles(popularity: pd.Series, tie) -> np.ndarray:
    """Percentile rank of each fact's popularity, in (0, 100], 100 = most popular.

    Equal popularities (mention counts and page views tie often) are ordered by `tie`, a
    seeded hash of the id (tie_breaks), so the top x% holds x% of the facts, every decile is
    a tenth of them, and the order depends on the facts and the seed, never on the rows' order.
    """
    order = np.lexsort((np.asarray(tie), popularity.to_numpy()))  # last key sorts first
    rank = np.empty(len(order), dtype="float64")
    rank[order] = np.arange(1, len(order) + 1)
    return 100.0 * rank / max(len(order), 1)
