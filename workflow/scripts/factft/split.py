"""Split the facts into a subject-disjoint test set and the finetuning subsets of the pool.

top/bottom = the most/least popular `fraction` of the pool, random = a seeded `fraction`,
whole = the pool. With stratify=relation each subset takes the same number of facts from
every relation, so top, bottom and random differ in popularity, not in relation mix.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

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
    max_drop_fraction: float | None = None,  # the split block's drop limit is for download/popularity
) -> dict[str, pd.DataFrame]:
    """The five tables top, bottom, random, whole, test, each with `split` and `popularity_pct`.

    Deterministic: which rows each table gets depends on the facts' content and the seed only,
    never on their row order; every table keeps the facts' row order.
    """
    if stratify not in STRATIFY:
        raise FactftError(f"split.stratify: '{stratify}' is unknown; use one of {list(STRATIFY)}")
    # Independent streams, so changing one cap does not reshuffle the test subjects.
    subject_rng, pool_rng, test_rng, random_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    facts = facts.reset_index(drop=True)

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

    groups = [g for _, g in pool.groupby("relation", sort=True)] if stratify == "relation" else [pool]
    counts = [math.floor(fraction * len(g) + 1e-9) for g in groups]
    if sum(counts) == 0:
        within = " within each relation (split.stratify: relation)" if stratify == "relation" else ""
        raise FactftError(
            f"dataset '{dataset}': split.fraction {fraction} of a pool of {len(pool)} facts{within} leaves "
            "top, bottom and random empty; raise split.fraction or split.pool_size, or use more facts"
        )
    chosen = {"top": [], "bottom": [], "random": []}
    for group, k in zip(groups, counts):
        if k == 0:
            continue
        # Ties in popularity are broken by id, so the order of the input rows never matters;
        # bottom takes the same order from the other end, so top and bottom never share a tie.
        ranked = group.sort_values(["popularity", "id"], ascending=[False, True], kind="stable").index
        chosen["top"].append(ranked[:k])
        chosen["bottom"].append(ranked[::-1][:k])
        by_id = group.sort_values("id", kind="stable").index
        chosen["random"].append(by_id[random_rng.choice(len(by_id), size=k, replace=False)])

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
    return {name: _finish(tables[name], name) for name in SPLITS}


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


def _finish(table: pd.DataFrame, name: str) -> pd.DataFrame:
    table = table.sort_index().reset_index(drop=True)
    table["split"] = name
    # Percentile within this table: 100 = most popular, ties share their average rank.
    table["popularity_pct"] = (100.0 * table["popularity"].rank(method="average") / len(table)).astype(
        "float64"
    )
    return table
