"""Parquet tables in and out (pyarrow), written atomically, and the facts-table contract."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from factft.errors import FactftError

log = logging.getLogger(__name__)

# The facts table after `popularity`: what split, evaluate and the figures read of every dataset.
FACT_COLUMNS = ("id", "question", "answers", "subject", "relation", "popularity")
TEMP_SUFFIX = ".tmp"


def make_parent(target: Path) -> None:
    """Create the folders above `target`; a file standing where a folder must be is a clear error."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in reversed(target.parents) if p.exists() and not p.is_dir()), target.parent)
        raise FactftError(
            f"cannot write {target}: {blocking} is a file where a folder is expected; move or delete "
            "that file (it is never overwritten)"
        ) from None


def _umask() -> int:
    # The only way to read the umask is to set it; it is put back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_name(target: Path) -> str:
    """The prefix of temporaries beside `target`: hidden, named after it, so a later run can
    recognise leftovers of a killed one (see remove_stale_temps)."""
    return f".{target.name}."


def _durable_replace(tmp: str | Path, target: str | Path) -> None:
    """Rename `tmp` (a file or folder) onto `target` once its bytes are on disk: after a node
    crash, `target` is whole or as it was, never a new name over lost data."""
    tmp, target = Path(tmp), Path(target)
    contents = [p for p in tmp.rglob("*") if not p.is_symlink()] if tmp.is_dir() else []
    for path in [*contents, tmp]:
        _fsync(path)
    os.replace(tmp, target)
    _fsync(target.parent)  # the rename itself


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder opens read-only too, and fsyncs its entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path, *, shared: bool = False):
    """Yield a temporary path beside `target`; rename it onto `target` only on success.

    No reader ever sees a half-written file, and a failure leaves an older `target` intact.
    Temporaries of `target` that a killed writer left are deleted first, except in a
    `shared` folder (a cache that other processes may be writing into at the same moment).
    """
    target = Path(target)
    if target.is_dir():
        raise FactftError(
            f"cannot write {target}: it is a folder, where a file is expected; move or delete it "
            "(it is never overwritten)"
        )
    make_parent(target)
    if not shared:
        remove_stale_temps(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(target), suffix=TEMP_SUFFIX, dir=target.parent)
    # mkstemp makes the file private (0600); an output gets the permissions any new file gets.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        _durable_replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(target: str | Path):
    """Yield an empty temporary folder beside `target`; rename it to `target` only on success.

    For outputs that are folders (models, adapters, checkpoints): `target` is complete or
    absent. It must not exist, or be an empty folder (rename replaces only those); a failure
    removes the temporary folder and leaves `target` as it was. A folder has one writer (its
    Snakemake job), so temporaries of `target` found here were left by a killed attempt: they
    are deleted (a model's can be gigabytes).
    """
    target = Path(target)
    check_new_dir(target)
    make_parent(target)
    remove_stale_temps(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(target), suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes the folder private (0700)
        yield tmp
        _durable_replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_new_dir(target: str | Path) -> None:
    """Fail, before any work, when a folder output exists with content (or as a file)."""
    target = Path(target)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        what = "a folder that is not empty" if target.is_dir() else "a file, where a folder is expected"
        raise FactftError(
            f"cannot write {target}: it already exists as {what}; delete it to make it again "
            "(it is never overwritten)"
        )


def remove_stale_temps(folder: str | Path, name: str = "*") -> None:
    """Delete temporaries (of outputs called `name`) that a killed job left in `folder`.

    Only for outputs that a single job writes (a Snakemake output, a job's checkpoints):
    a shared cache may hold another process's temporary that is still being written.
    """
    prefix = temp_name(Path(name))
    for stale in Path(folder).glob(f"{prefix}*{TEMP_SUFFIX}"):
        if name != "*" and "." in stale.name[len(prefix) : -len(TEMP_SUFFIX)]:
            continue  # another output's: `.a.png.x.<random>.tmp` is a.png.x's, not a.png's
        log.info("removing %s, left by an interrupted run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


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


def read_tsv(path: str | Path, kind: str = "table", **options) -> pd.DataFrame:
    """Read a tab-separated table (pandas.read_csv `options`); a missing or malformed file is a
    FactftError naming it as `kind`."""
    try:
        return pd.read_csv(path, sep="\t", **options)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise FactftError(f"cannot read {kind} {path}: {error}") from None


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


def drop_invalid(
    table: pd.DataFrame, invalid: dict[str, pd.Series], where: str, max_drop_fraction: float
) -> pd.DataFrame:
    """Drop the rows flagged in `invalid` (reason -> boolean mask), warn of the counts per
    reason (a run that succeeds must not lose rows unseen), and fail when more than
    `max_drop_fraction` of the rows go (the data is then not what the config says it is)."""
    bad = pd.Series(False, index=table.index)
    for reason, mask in invalid.items():
        fresh = mask & ~bad
        if fresh.any():
            log.warning("%s: dropping %d rows: %s", where, int(fresh.sum()), reason)
        bad |= mask
    dropped, total = int(bad.sum()), len(table)
    if total == 0:
        raise FactftError(f"{where}: the source has no rows")
    reasons = {reason: int(mask.sum()) for reason, mask in invalid.items() if mask.any()}
    if dropped == total:
        raise FactftError(
            f"{where}: all {total} rows are invalid ({reasons}), nothing is left; check the column "
            "mapping and the source's values"
        )
    if dropped / total > max_drop_fraction:
        raise FactftError(
            f"{where}: {dropped} of {total} rows are invalid ({reasons}), more than split.max_drop_fraction "
            f"{max_drop_fraction}; check the column mapping, or raise split.max_drop_fraction"
        )
    log.info("%s: kept %d of %d rows", where, total - dropped, total)
    return table[~bad]
