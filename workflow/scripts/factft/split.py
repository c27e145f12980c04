"""Split the facts into a subject-disjoint test set and the finetuning pool, and cut subsets
from the pool.

test = the facts of a seeded share of the subjects (subjects that share a question held out
together: subject_groups), whole = the rest (the pool); each has a
cap of its own. top/bottom = the most/least popular `fraction` of the pool, random = a
seeded `fraction`; a sized subset (top25, bottom10, random25: factft.subsets) takes that
percent. With stratify=relation each subset takes the same number of facts from every
relation, so top, bottom and random differ in popularity, not in relation mix.

Every table is a job of its own (rules/data.smk): a setting reruns the tables it shapes and
the runs that read them, no others (split.fraction reruns no FT-Whole run, split.test_size
no finetune at all).
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pandas as pd

from factft import subsets
from factft.errors import FactftError
from factft.prompts import prompt_keys

log = logging.getLogger(__name__)

SPLITS = ("top", "bottom", "random", "whole", "test")
# split_part's tables, each with its cap; the other subsets are cut from whole by pool_subset.
CAPS = {"whole": "pool_size", "test": "test_size"}
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
    """The five tables top, bottom, random, whole, test at once, as the workflow's jobs make
    them one by one (split_part, then pool_subset on whole)."""
    settings = dict(dataset=dataset, test_fraction=test_fraction, pool_size=pool_size, test_size=test_size, seed=seed)
    parts = {part: split_part(facts, part, **settings) for part in CAPS}
    tables = {
        name: pool_subset(parts["whole"], name, dataset=dataset, fraction=fraction, stratify=stratify, seed=seed)
        for name in ("top", "bottom", "random")
    }
    tables.update(parts)
    return {name: tables[name] for name in SPLITS}


def split_part(
    facts: pd.DataFrame,
    part: str,
    *,
    dataset: str = "facts",
    test_fraction: float = 0.3,
    pool_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The test set (`part` test, capped at test_size) or the finetuning pool (whole, capped
    at pool_size), with `split` and `popularity_pct`; the other part's cap is not read.

    Deterministic: which rows a table gets depends on the facts' content and the seed only,
    never on their row order; every table keeps the facts' row order.
    """
    if part not in CAPS:
        raise FactftError(f"split: '{part}' is not a part of the subject split; use one of {list(CAPS)}")
    subject_rng, pool_rng, test_rng = _streams(seed)[:3]
    facts = facts.reset_index(drop=True)
    # Test subjects never appear in finetuning: the experiment measures extraction of facts
    # stored in pretraining, not facts taught by finetuning.
    groups = subject_groups(facts)
    subjects = np.array(sorted(groups.unique()), dtype=object)
    if len(subjects) < 2:
        count = facts["subject"].nunique()
        raise FactftError(
            f"dataset '{dataset}': {count} subject(s); a subject-disjoint split needs 2 or more"
            if count < 2
            else f"dataset '{dataset}': its {count} subjects all share questions, so none can be held out; check "
            f"that datasets.{dataset}.columns.question names each fact's own question (not a template)"
        )
    shared = facts.groupby(groups)["subject"].nunique().loc[lambda sizes: sizes > 1]
    if len(shared):
        log.info(
            "dataset '%s': %d subjects share questions, held out together in %d groups",
            dataset, int(shared.sum()), len(shared),
        )  # fmt: skip
        largest = groups[groups.isin(shared.index)].value_counts()
        if largest.iloc[0] > test_fraction / 2 * len(facts):
            log.warning(
                "dataset '%s': %d subjects share questions and are held out as one group of %d of the %d facts, "
                "so the test set's size swings with split.seed; check that datasets.%s.columns.question names "
                "each fact's own question (not a template)",
                dataset, shared[largest.index[0]], largest.iloc[0], len(facts), dataset,
            )  # fmt: skip
    n_test = min(max(1, round(test_fraction * len(subjects))), len(subjects) - 1)
    in_test = groups.isin(set(subject_rng.permutation(subjects)[:n_test]))
    if part == "test":
        table = _cap(facts[in_test], test_size, test_rng, f"dataset '{dataset}': split.test_size")
    else:
        table = _cap(facts[~in_test], pool_size, pool_rng, f"dataset '{dataset}': split.pool_size")
    log.info(
        "dataset '%s': %d of %d subject groups held out; %s has %d facts",
        dataset,
        n_test,
        len(subjects),
        part,
        len(table),
    )
    return _finish(table, part, _tie(table, seed))


def subject_groups(facts: pd.DataFrame) -> pd.Series:
    """Per fact, the group of subjects it is held out with: subjects that share a question (the
    same words in any case, and the same choices) are one group, named by its first subject in
    sorted order. A prompt shows the question, not the subject column, so a question filed under
    two subjects (a copy with other aliases, a name two subjects share) must not be tested and
    finetuned on at once. Where no subjects share a question, each is a group of its own."""
    if facts["subject"].isna().any():
        raise FactftError("a fact without a subject: a subject-disjoint split needs every fact's subject")
    parent: dict = {}

    def root(subject):
        while parent.setdefault(subject, subject) != subject:
            parent[subject] = subject = parent[parent[subject]]  # path halving: short chains
        return subject

    first_subject: dict[tuple, object] = {}
    for subject, prompt in zip(facts["subject"], prompt_keys(facts)):
        a, b = root(subject), root(first_subject.setdefault(prompt, subject))
        if a != b:  # the smaller name stays the root: a group is named by its first subject
            parent[max(a, b)] = min(a, b)
    return facts["subject"].map(root)


def pool_subset(
    whole: pd.DataFrame,
    name: str,
    *,
    dataset: str = "facts",
    fraction: float = 0.5,
    stratify: str = "relation",
    seed: int = 0,
) -> pd.DataFrame:
    """The subset `name` of the pool `whole` (split_part's table), with `split` and
    `popularity_pct`: top, bottom or random (each `fraction` of the pool), or a sized one
    (top25, bottom10, random25), whose name gives its share and which ignores `fraction`.

    top25 is the head of top's order, bottom likewise from the other end; the sized random
    subsets are heads of one seeded order per relation of their own, so random10 lies inside
    random25 (but not inside random, an independent draw).
    """
    if stratify not in STRATIFY:
        raise FactftError(f"split.stratify: '{stratify}' is unknown; use one of {list(STRATIFY)}")
    kind, percent = subsets.parse(name)
    if kind == "whole":
        raise FactftError(f"split: '{name}' is the pool itself, not a subset cut from it")
    whole = whole.reset_index(drop=True)
    tie = _tie(whole, seed)
    if percent is None:
        rows = _fraction_subsets(whole, tie, dataset=dataset, fraction=fraction, stratify=stratify, seed=seed)[kind]
    else:
        rows = _sized_subset(whole, tie, kind, percent, stratify=stratify, seed=seed)
        if len(rows) == 0:
            raise FactftError(
                f"dataset '{dataset}': subset '{name}' ({percent}% of a pool of {len(whole)} facts"
                f"{_within(stratify)}) is empty; raise its percent, or split.pool_size where it caps the pool, or use "
                "more facts"
            )
    log.info("dataset '%s': %s takes %d of the pool's %d facts", dataset, name, len(rows), len(whole))
    return _finish(whole.loc[sorted(rows)], name, tie)


def _fraction_subsets(
    pool: pd.DataFrame, tie: pd.Series, *, dataset: str, fraction: float, stratify: str, seed: int
) -> dict[str, np.ndarray]:
    """The rows of top, bottom and random, drawn together: top and bottom are checked against
    each other, and random's draws follow the groups in order."""
    random_rng = _streams(seed)[3]
    groups = _groups(pool, stratify)
    counts = [_count(fraction, g) for g in groups]
    if sum(counts) == 0:
        raise FactftError(
            f"dataset '{dataset}': split.fraction {fraction} of a pool of {len(pool)} facts{_within(stratify)} leaves "
            "top, bottom and random empty; raise split.fraction, or split.pool_size where it caps the pool, or "
            "use more facts"
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
    return {name: np.concatenate(rows) for name, rows in chosen.items()}


def _sized_subset(
    pool: pd.DataFrame, tie: pd.Series, kind: str, percent: int, *, stratify: str, seed: int
) -> np.ndarray:
    sized_rng = _streams(seed)[4]
    rows = [np.array([], dtype="int64")]
    for group in _groups(pool, stratify):
        if kind == "random":
            order = _by_id(group)[sized_rng.permutation(len(group))]
        else:
            ranked = _ranked(group, tie)
            order = ranked if kind == "top" else ranked[::-1]
        rows.append(order[: _count(percent / 100, group)])
    return np.concatenate(rows)


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


def _tie(table: pd.DataFrame, seed: int) -> pd.Series:
    """tie_breaks of the table's ids, by row: the percentiles' and top/bottom's order of equals."""
    return pd.Series(tie_breaks(table["id"], seed), index=table.index)


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
