"""Parquet tables in and out (pyarrow), written atomically, and the facts-table contract."""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from factft.errors import FactftError

# The facts table after `popularity` (DESIGN.md, "Data contracts").
FACT_COLUMNS = ("id", "question", "answers", "subject", "relation", "popularity")


@contextmanager
def atomic_path(target: str | Path):
    """Yield a temporary path beside `target`; rename it onto `target` only on success.

    No reader ever sees a half-written file, and a failure leaves an older `target` intact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a parquet table; an unreadable file is a FactftError naming it."""
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as error:
        raise FactftError(f"cannot read table {path}: {error}") from None


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """Write a parquet table atomically, without the pandas index."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)


def write_tsv(table: pd.DataFrame, path: str | Path) -> None:
    """Write a tab-separated table atomically (metrics, summaries)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")


def check_facts(facts: pd.DataFrame, where: str) -> None:
    """Check the facts-table contract; `where` names the dataset or file in the error."""
    missing = [c for c in FACT_COLUMNS if c not in facts.columns]
    if missing:
        raise FactftError(f"{where}: facts table lacks columns {missing}; has {list(facts.columns)}")
    duplicated = facts["id"][facts["id"].duplicated()]
    if len(duplicated):
        raise FactftError(
            f"{where}: {len(duplicated)} duplicate ids, e.g. {list(duplicated.unique()[:3])}; "
            "ids must be unique (map columns.id to a unique column, or leave it out)"
        )
    bad = facts["popularity"].map(lambda p: not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 0))
    if bad.any():
        raise FactftError(f"{where}: {int(bad.sum())} rows have popularity that is not finite and >= 0")
    empty = facts["answers"].map(len) == 0
    if empty.any():
        raise FactftError(f"{where}: {int(empty.sum())} rows have no answers")
