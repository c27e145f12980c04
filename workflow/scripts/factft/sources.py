"""Reading every kind of dataset source into the raw facts table.

A source is a config entry: `{hf: id, name?, split?, revision?}` (the Hugging Face hub),
`{path: file, reader?}` (csv, tsv, jsonl, json, parquet) or `{url, sha256?, reader?}` (a file or
archive fetched once into the cache); `reader` names the file's kind where its name does not.
`columns` maps facts columns to source columns; the result is the raw facts table that `popularity`
scores: id, question, answers (list<str>), subject, relation (+ choices, answer_index for
multiple choice, + kept columns).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import re
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import requests

from factft.errors import FactftError
from factft.net import get_with_retries, hub_connection_errors, hub_failure
from factft.popularity import SCORERS
from factft.prompts import prompt_keys, text_key
from factft.tables import atomic_path, drop_invalid

log = logging.getLogger(__name__)


FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".zip")
# A drop reason of its own: the answers column holds something else (a dict, a bool), not just nothing.
MISSHAPED = "answers not a list or a string"

# EntityQuestions asks every relation with one template; the subject is what fills `{}`.
ENTITYQUESTIONS_TEMPLATES = {
    "P17": "Which country is {} located in?",
    "P19": "Where was {} born?",
    "P20": "Where did {} die?",
    "P26": "Who is {} married to?",
    "P36": "What is the capital of {}?",
    "P40": "Who is {}'s child?",
    "P50": "Who is the author of {}?",
    "P69": "Where was {} educated?",
    "P106": "What kind of work does {} do?",
    "P112": "Who founded {}?",
    "P127": "Who owns {}?",
    "P131": "Where is {} located?",
    "P136": "What type of music does {} play?",
    "P159": "Where is the headquarter of {}?",
    "P170": "Who was {} created by?",
    "P175": "Who performed {}?",
    "P176": "Which company is {} produced by?",
    "P264": "What music label is {} represented by?",
    "P276": "Where is {} located?",
    "P407": "Which language was {} written in?",
    "P413": "What position does {} play?",
    "P495": "Which country was {} created in?",
    "P740": "Where was {} founded?",
    "P800": "What is {} famous for?",
}


# ---- the entry point --------------------------------------------------------------


def load_facts(spec: dict, cache_dir: str | Path, max_drop_fraction: float) -> pd.DataFrame:
    """The raw facts table of one dataset config entry (`spec` carries its `name`)."""
    table = read_source(spec, cache_dir)
    return to_facts(table, spec, max_drop_fraction)


def read_source(spec: dict, cache_dir: str | Path) -> pd.DataFrame:
    """The source table as it is, before the column mapping."""
    name, source = spec["name"], spec["source"]
    if "hf" in source:
        return read_hf(name, source, cache_dir)
    if "path" in source or "url" in source:
        kind = file_kind(name, source)  # before a fetch: a URL that names no kind fails at once
        if "path" in source:
            path = Path(source["path"])
        else:
            path = fetch_url(source["url"], Path(cache_dir) / "downloads", source.get("sha256"))
        return read_entityquestions(path) if kind == "entityquestions" else read_file(path, kind=kind)
    raise FactftError(
        f"datasets.{name}.source: no hf, path or url; synthetic worlds are made by the synthetic_world rule"
    )


def file_kind(name: str, source: dict) -> str:
    """How a `path` or `url` source's file is read: as its `reader` names, else by the kind
    its name ends in (one of FILE_SUFFIXES, .gz allowed); an error naming the key where
    neither tells. Checked when the workflow starts (config.check_config), and again here."""
    reader = source.get("reader", "auto")
    if reader != "auto":
        return reader if reader == "entityquestions" else f".{reader}"
    where = source["path"] if "path" in source else urlparse(source["url"]).path
    suffix = _suffix(PurePosixPath(where))
    if suffix not in FILE_SUFFIXES:
        kinds = [kind.lstrip(".") for kind in FILE_SUFFIXES if kind != ".zip"]
        raise FactftError(
            f"datasets.{name}.source: cannot tell the kind of file {source.get('path') or source['url']} from "
            f"its name; factft reads {', '.join(kinds)} (also .gz) and EntityQuestions' .zip: set "
            f"datasets.{name}.source.reader to the kind it is, or save it as one of them"
        )
    return suffix


# ---- hub, files, urls -------------------------------------------------------------


def read_hf(name: str, source: dict, cache_dir: str | Path) -> pd.DataFrame:
    """One split of a hub dataset (or of a local folder in the hub's layout), via datasets.

    A hub dataset of csv/tsv files (PopQA is one test.tsv) is read with only empty cells
    missing, as read_file reads them: datasets' csv reader otherwise takes pandas' default
    missing-value strings, and a subject "None" or "NA" would become empty and be dropped.
    Those options are part of the dataset's cache key, so they are asked for first (offline,
    only the cache made with them is found); a builder that is not csv refuses them, as does
    an offline cache made without them, and the dataset is then loaded as it comes.
    """
    import datasets

    builder_of = functools.partial(
        datasets.load_dataset_builder,
        source["hf"],
        source.get("name"),
        revision=source.get("revision"),
        cache_dir=str(Path(cache_dir) / "datasets"),
    )
    try:
        try:
            builder = builder_of(keep_default_na=False, na_values=[""])
        except ValueError:
            builder = builder_of()
        builder.download_and_prepare()
        loaded = builder.as_dataset(split=source.get("split", "test"))
    except datasets.exceptions.DatasetNotFoundError as error:
        raise FactftError(
            f"dataset '{name}': {error}; check datasets.{name}.source.hf (gated datasets also need "
            "`hf auth login`)"
        ) from None
    except hub_connection_errors() as error:
        raise FactftError(
            f"dataset '{name}': cannot reach the Hugging Face hub ({hub_failure(error)}); run "
            f"`snakemake download_datasets` where there is internet, or set datasets.{name}.source.path "
            "to a local copy"
        ) from None
    except ValueError as error:
        # Unknown split or configuration name: datasets lists the ones that exist.
        raise FactftError(
            f"dataset '{name}': {error}; check datasets.{name}.source.split and .name"
        ) from None
    return loaded.to_pandas()


def read_file(path: str | Path, kind: str | None = None) -> pd.DataFrame:
    """A csv, tsv, jsonl, json or parquet file (optionally .gz) as a table, of the `kind` (one of
    FILE_SUFFIXES) its name ends in unless given; a .zip is read as EntityQuestions' archive,
    the one archive layout known here. A csv or tsv file's cells are read as the text they are
    ("007", "1984"), empty cells as missing."""
    path = Path(path)
    suffix = kind or _suffix(path)
    if suffix not in FILE_SUFFIXES:
        raise FactftError(
            f"cannot read {path}: unknown file type '{suffix}'; use one of {list(FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise FactftError(f"cannot read {path}: no such file")
    if path.stat().st_size == 0:
        raise FactftError(f"cannot read {path}: the file is empty")
    if suffix == ".zip":
        return read_entityquestions(path)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            # Only empty cells are missing: "NA" and "None" are real answers (Namibia, a song). Text
            # stays text: read as numbers, an answer "007" would become 7 and a subject "1984" 1984.0.
            sep = "\t" if suffix == ".tsv" else ","
            table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
            return table.apply(_integers_written_as_floats)
        if suffix == ".jsonl":
            return pd.DataFrame.from_records(_json_lines(path))
        with _open_text(path) as stream:
            try:
                records = json.load(stream)
            except json.JSONDecodeError as error:
                hint = "; one record a line is JSON Lines: name the file .jsonl" if error.msg == "Extra data" else ""
                raise ValueError(f"{error}{hint}") from None
        if not isinstance(records, list):
            raise ValueError("expected a JSON list of records")
        return pd.DataFrame.from_records(records)
    except UnicodeDecodeError as error:
        raise FactftError(f"cannot read {path}: it is not UTF-8 text ({error}); save it as UTF-8") from None
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as error:
        raise FactftError(f"cannot read {path}: {error}") from None


def _integers_written_as_floats(column: pd.Series) -> pd.Series:
    """A column whose every cell is an integer written as a float ("1990.0") as the integers:
    pandas' to_csv writes an integer column with a missing cell so (years, answer indices)."""
    filled = column.dropna()
    if len(filled) and filled.str.fullmatch(r"-?\d+\.0").all():
        return column.str.removesuffix(".0")
    return column


def _suffix(path: Path) -> str:
    stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return PurePosixPath(stem).suffix.lower()


def _json_lines(path: Path) -> list:
    """The records of a JSON Lines file; an unreadable one is named by its line number."""
    with _open_text(path) as lines:
        records = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"line {number}, column {error.colno}: {error.msg}") from None
        return records


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark, as some Windows editors write, is read past.
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def fetch_url(
    url: str, folder: str | Path, sha256: str | None = None, *, attempts: int = 5, backoff: float = 1.0
) -> Path:
    """The file at `url`, fetched once into `folder` and checked against `sha256` when given."""
    basename = PurePosixPath(urlparse(url).path).name or "download"
    target = Path(folder) / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{basename}"
    if target.is_file():
        found = _sha256(target)
        if sha256 and found != sha256:
            raise FactftError(
                f"cached {target} (from {url}) has sha256 {found}, the config says {sha256}; "
                "delete the file to fetch it again, or correct source.sha256"
            )
        log.info("using cached %s", target)
        return target
    log.info("fetching %s", url)
    with requests.Session() as session:
        response = get_with_retries(session, url, attempts=attempts, backoff=backoff, stream=True)
        with response, atomic_path(target, shared=True) as tmp:
            if response.status_code != 200:
                raise FactftError(f"cannot fetch {url}: HTTP {response.status_code}; check source.url")
            digest = hashlib.sha256()
            try:
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except requests.RequestException as error:
                raise FactftError(f"fetching {url} broke off ({error}); run it again") from None
            if sha256 and digest.hexdigest() != sha256:
                raise FactftError(
                    f"{url}: sha256 is {digest.hexdigest()}, the config says {sha256}; "
                    "the file changed upstream or source.sha256 is wrong (nothing was cached)"
                )
    log.info("cached %s (sha256 %s)", target, _sha256(target))
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- EntityQuestions --------------------------------------------------------------


def read_entityquestions(path: str | Path) -> pd.DataFrame:
    """EntityQuestions' dataset.zip: dataset/{train,dev,test}/P*.{split}.json, one file per relation.

    Every split is read (the workflow makes its own subject-disjoint split); the relation is
    the file's P-id and the subject is recovered from the question through its template. A
    question that fits no template keeps an empty subject, so the download drops and counts it
    (split.max_drop_fraction) rather than stopping on one odd question among 220,000.
    """
    pattern = re.compile(r"^(?:[^/]+/)?(train|dev|test)/(P\d+)\.\1\.json$")
    rows, misfits = [], []
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted(m for m in archive.namelist() if pattern.search(m))
            if not members:
                raise FactftError(
                    f"{path}: no dataset/{{train,dev,test}}/P*.{{split}}.json files; "
                    "is this EntityQuestions' dataset.zip?"
                )
            for member in members:
                split, relation = pattern.search(member).group(1, 2)
                subject_of = _template_matcher(relation, f"{path}:{member}")
                for item in json.loads(archive.read(member)):
                    question = item["question"]
                    subject = subject_of(question)
                    if not subject:
                        misfits.append(f"{member}: {question!r}")
                    rows.append(
                        {
                            "question": question,
                            "answers": list(item["answers"]),
                            "subject": subject,
                            "relation": relation,
                            "source_split": split,
                        }
                    )
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError) as error:
        raise FactftError(f"cannot read {path} as EntityQuestions' dataset.zip: {error}") from None
    if misfits:
        log.warning(
            "%s: questions that fit no template of their relation, their subject left empty (dropped, "
            "split.max_drop_fraction): %d, the first %s",
            path, len(misfits), misfits[0],
        )  # fmt: skip
    return pd.DataFrame.from_records(rows)


def _template_matcher(relation: str, where: str):
    template = ENTITYQUESTIONS_TEMPLATES.get(relation)
    if template is None:
        raise FactftError(
            f"{where}: relation {relation} has no question template; known relations are "
            f"{sorted(ENTITYQUESTIONS_TEMPLATES, key=lambda p: int(p[1:]))}"
        )
    before, after = template.split("{}")
    regex = re.compile(re.escape(before) + "(.+)" + re.escape(after))

    def subject_of(question: str) -> str:
        """The subject, or "" where the question does not fit the template."""
        match = regex.fullmatch(question.strip())
        return match.group(1) if match else ""

    return subject_of


# ---- column mapping and cleaning --------------------------------------------------


def to_facts(table: pd.DataFrame, spec: dict, max_drop_fraction: float) -> pd.DataFrame:
    """Map, parse and clean a source table into the raw facts table (see the module doc)."""
    name = spec["name"]
    mapping = _mapping(spec)
    read = kept_columns(spec)
    wanted = [(f"columns.{key}", column) for key, column in mapping.items()]
    if len(table) == 0:  # before any parsing: an empty csv's columns are not even text
        raise FactftError(f"dataset '{name}': the source has no rows")
    table = _with_fields(table, name, wanted + read)
    _require_columns(table, name, wanted + read)
    kept = [column for _, column in read]
    table = table.reset_index(drop=True)

    facts = pd.DataFrame(
        {
            "id": (
                table[mapping["id"]].map(_text)
                if "id" in mapping
                else [f"{name}-{row}" for row in range(len(table))]
            ),
            "question": table[mapping["question"]].map(_text),
            "subject": table[mapping["subject"]].map(_text),
            # Without a relation column (columns.relation: null), the dataset is one relation.
            "relation": table[mapping["relation"]].map(_text) if "relation" in mapping else name,
        }
    )
    invalid = {
        "empty id": facts["id"] == "",
        "empty question": facts["question"] == "",
        "empty subject": facts["subject"] == "",
        "empty relation": facts["relation"] == "",
    }
    if spec.get("format", "open") == "multiple_choice":
        facts["choices"] = table[mapping["choices"]].map(_choices)
        facts["answer_index"] = table[mapping["answer_index"]].map(_index)
        invalid["choices missing, unreadable or fewer than 2"] = facts["choices"].map(len) < 2
        invalid["an empty choice"] = facts["choices"].map(lambda choices: "" in choices)
        invalid["a choice repeated"] = facts["choices"].map(lambda choices: len(set(choices)) < len(choices))
        in_range = [0 <= i < len(c) for c, i in zip(facts["choices"], facts["answer_index"])]
        invalid["answer_index missing or outside choices"] = ~pd.Series(in_range, index=facts.index)
        facts["answers"] = [
            [c[i]] if ok else [] for c, i, ok in zip(facts["choices"], facts["answer_index"], in_range)
        ]
    else:
        answers = table[mapping["answers"]]
        facts["answers"] = answers.map(parse_answers)
        _warn_unread_lists(facts["answers"], name, mapping["answers"])
        invalid[MISSHAPED] = ~answers.map(_answers_shaped)
        invalid["no answers"] = (facts["answers"].map(len) == 0) & ~invalid[MISSHAPED]
    for key, column in read:
        facts[column] = _storable(table[column], f"datasets.{name}.{key}", column)

    facts = drop_invalid(facts, invalid, f"dataset '{name}'", max_drop_fraction)
    _check_unique_ids(facts, name, mapping)
    facts = _drop_repeats(facts, name, max_drop_fraction)
    _check_subjects(facts, name, mapping["subject"])
    order = ["id", "question", "answers", "subject", "relation"]
    order += [c for c in ("choices", "answer_index") if c in facts] + kept
    facts = facts[order].reset_index(drop=True)
    if "answer_index" in facts:
        facts["answer_index"] = facts["answer_index"].astype("int64")
    return facts


def _mapping(spec: dict) -> dict:
    """facts column -> source column, with the defaults that need no config."""
    columns = spec.get("columns") or {}
    mapping = {key: columns.get(key, key) for key in ("question", "subject", "relation")}
    if mapping["relation"] is None:
        del mapping["relation"]
    if "id" in columns:
        mapping["id"] = columns["id"]
    if spec.get("format", "open") == "multiple_choice":
        mapping["choices"] = columns.get("choices", "choices")
        mapping["answer_index"] = columns.get("answer_index", "answer_index")
    else:
        mapping["answers"] = columns.get("answers", "answers")
    return mapping


def kept_columns(spec: dict) -> list[tuple[str, str]]:
    """(config key, column) of keep_columns, plus the column the popularity scorer reads;
    an error names the key of one that would overwrite a facts column."""
    kept = [("keep_columns", column) for column in spec.get("keep_columns") or []]
    popularity = spec.get("popularity") or {}
    scorer = SCORERS.get(popularity.get("scorer"))
    key = scorer and scorer.source_column
    if key and popularity.get(key) and popularity[key] not in [column for _, column in kept]:
        kept.append((f"popularity.{key}", popularity[key]))
    # The facts columns, and those that popularity and split add.
    reserved = ["id", "question", "answers", "subject", "relation", "choices", "answer_index", "popularity"]
    reserved += ["popularity_source", "split", "popularity_pct"]
    for key, column in kept:
        # A source column named popularity may be the one scored: the score takes its place.
        if column in reserved and (key, column) != ("popularity.column", "popularity"):
            raise FactftError(
                f"datasets.{spec['name']}.{key}: source column '{column}' has the name of a facts column "
                f"({', '.join(reserved)}); map those through datasets.{spec['name']}.columns, and give a "
                "column to keep or score another name in the source"
            )
    return kept


def _with_fields(table: pd.DataFrame, name: str, wanted: list[tuple[str, str]]) -> pd.DataFrame:
    """`table` with a column for each wanted name `column.field` (or deeper) that is not a
    column itself but a field of one's records: hub datasets nest them (TriviaQA's
    `answer.aliases`, ARC's `choices.text`). A record without the field is missing."""
    fields = {}
    for key, wanted_name in wanted:
        root, dot, path = wanted_name.partition(".")
        if wanted_name in table.columns or not dot or root not in table.columns:
            continue
        cells = table[root].map(lambda cell: _field(cell, path.split(".")))
        if cells.map(_missing).all():
            raise FactftError(
                f"dataset '{name}': column '{root}' has no field '{path}' (named in datasets.{name}.{key}); "
                f"its first value: {str(table[root].iloc[0])[:200] if len(table) else 'none'}"
            )
        fields[wanted_name] = cells
    return table.assign(**fields) if fields else table


def _field(cell, path: list[str]):
    for part in path:
        if not isinstance(cell, dict) or part not in cell:
            return None
        cell = cell[part]
    return cell


def _require_columns(table: pd.DataFrame, name: str, wanted: list[tuple[str, str]]) -> None:
    columns = [str(c) for c in table.columns]
    for key, column in wanted:
        if column not in table.columns:
            # A key the config leaves out names the column of its own name.
            default = " (its default name)" if key == f"columns.{column}" else ""
            # One column whose name holds the separators: a file split on the wrong character.
            joined = len(columns) == 1 and next((sep for sep in ";|\t," if sep in columns[0]), None)
            hint = f"; the file looks {joined!r}-separated, which its kind does not read" if joined else ""
            raise FactftError(
                f"dataset '{name}': column '{column}' named in datasets.{name}.{key}{default} is missing from "
                f"the source; its columns are: {columns}{hint}"
            )


def _drop_repeats(facts: pd.DataFrame, name: str, max_drop_fraction: float) -> pd.DataFrame:
    """Drop rows that repeat an earlier row's question, choices and answers (question and
    aliases in any case, aliases in any order), whatever their subject: a prompt shows only
    those, so a repeat is the same example, counted twice in the test set's accuracy or trained
    on twice, and one filed under another subject (an MMLU question under two topics) could be
    held out and finetuned on at once. A mass of repeats is a column mapped wrongly (a template
    as the question): more than `max_drop_fraction` of the rows is a warning, more than half an
    error. A question asked again with other answers is kept, and named in a warning."""
    prompts = prompt_keys(facts)
    answers = facts["answers"].map(lambda aliases: tuple(sorted({text_key(a) for a in aliases})))  # no order
    repeats = pd.Series(list(zip(prompts, answers)), index=facts.index).duplicated()
    count, fact = int(repeats.sum()), "question, choices and answer" if "choices" in facts else "question and answers"
    if count:
        left = len(facts) - count
        log.warning("dataset '%s': dropping %d rows that repeat an earlier row's %s; %d left", name, count, fact, left)
    if count > max_drop_fraction * len(facts):
        problem = (
            f"dataset '{name}': {count} of {len(facts)} rows repeat an earlier row's {fact}; check that "
            f"datasets.{name}.columns.question names each fact's own question (not a template)"
        )
        if count > len(facts) / 2:
            raise FactftError(problem)
        log.warning(problem)
    kept = pd.DataFrame({"prompt": prompts, "answers": answers, "question": facts["question"]})[~repeats]
    differing = kept.groupby("prompt", sort=False)["answers"].transform("size") > 1
    if differing.any():
        first = kept.loc[differing, "prompt"].iloc[0]
        example = kept.index[kept["prompt"] == first][:2]
        log.warning(
            "dataset '%s': %d question(s) asked again with other answers, in %d rows (e.g. %r: %s); each "
            "row is kept, its own answers its gold: homonymous subjects (two people named alike) do this, "
            "so does a question whose answers differ from row to row",
            name, kept[differing]["prompt"].nunique(), int(differing.sum()), kept.at[example[0], "question"],
            " / ".join(str(list(facts.at[i, "answers"])) for i in example),
        )  # fmt: skip
    return facts[~repeats]


def _storable(values: pd.Series, key: str, column: str) -> pd.Series:
    """A kept column as parquet can store it: one that mixes text and numbers (a JSON "n/a"
    among view counts) becomes text, its missing cells left missing; the popularity scorer
    reads numbers from text, and counts the rest as missing."""
    if values.dtype != object:
        return values
    try:
        pa.array(values, from_pandas=True)
        return values
    except (pa.ArrowException, ValueError, TypeError):
        pass
    text = values.map(lambda value: value if _missing(value) or not pd.api.types.is_scalar(value) else str(value))
    try:
        pa.array(text, from_pandas=True)
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise FactftError(
            f"{key}: source column '{column}' mixes values a table column cannot hold together, lists and "
            f"single values ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        ) from None
    return text


def _check_subjects(facts: pd.DataFrame, name: str, column: str) -> None:
    """The split holds out whole subjects: a dataset whose facts all share one stops here,
    before its popularity is scored (a model's job for model_confidence)."""
    subjects = facts["subject"].unique()
    if len(subjects) < 2:
        raise FactftError(
            f"dataset '{name}': every fact has the subject {list(subjects)} (source column '{column}', "
            f"datasets.{name}.columns.subject); the test set holds out subjects, so it needs 2 or more: "
            "map columns.subject to a column that tells the facts apart"
        )


def _check_unique_ids(facts: pd.DataFrame, name: str, mapping: dict) -> None:
    duplicated = facts["id"][facts["id"].duplicated()]
    if len(duplicated):
        raise FactftError(
            f"dataset '{name}': {len(duplicated)} duplicate ids in column '{mapping.get('id')}', e.g. "
            f"{list(duplicated.unique()[:3])}; map datasets.{name}.columns.id to a unique column, "
            "or leave it out to number the rows"
        )


def parse_answers(value) -> list[str]:
    """A list of non-empty answer strings from a list, an array or a list written as text.

    PopQA stores its aliases as a JSON string, and pandas' `to_csv` writes a list column as
    Python's repr (`['Paris', 'City of Light']`): both are lists. Any other string, or a
    number (a year in a jsonl or parquet file), is one answer.
    """
    if _number(value):
        value = [int(value) if float(value).is_integer() else value]
    if isinstance(value, str):
        text = value.strip()
        value = _list_literal(text) if text.startswith("[") else None
        if value is None:
            value = [text]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return []
    answers = []
    for item in value:
        text = _text(item)
        if text and text not in answers:
            answers.append(text)
    return answers


def _warn_unread_lists(answers: pd.Series, name: str, column: str) -> None:
    """Warn where answer cells read as one answer each look like several: a list that does not
    parse ('["Paris"'), or answers joined by | or ; in a tenth of the rows or more. Each is then
    one answer that no prediction matches, and the dataset's accuracy a silent zero."""
    single = answers.map(lambda found: found[0] if len(found) == 1 else "")
    broken = single.str.match(r"\[.*[\"',]")  # a list's bracket, then a quote or comma: not "[citation needed]"
    joined = single.str.contains(r"[|;]")
    if broken.any() or joined.mean() >= 0.1:
        looks = single[broken | joined]
        log.warning(
            "dataset '%s': %d answer cells of column '%s' look like lists but are read as one answer each "
            "(e.g. %r); write several answers as a JSON list, [\"a\", \"b\"]",
            name, len(looks), column, looks.iloc[0],
        )  # fmt: skip


def _list_literal(text: str) -> list | None:
    """`text` read as a JSON or Python list, else None (an answer that starts with "[")."""
    for read in (json.loads, ast.literal_eval):
        try:
            value = read(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    return None


def _number(value) -> bool:
    numeric = isinstance(value, (int, float, np.integer, np.floating))
    return numeric and not isinstance(value, (bool, np.bool_)) and not pd.isna(value)


def _answers_shaped(value) -> bool:
    """Whether parse_answers can read `value` (missing counts as readable: it is just empty)."""
    return _missing(value) or _number(value) or isinstance(value, (str, list, tuple, np.ndarray))


def _choices(value) -> list[str]:
    """Choices keep their order and count: answer_index points into them. A list, an array,
    or a JSON or Python list written as text (a csv cell); anything else is no choices."""
    if isinstance(value, str):
        value = _list_literal(value.strip())
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return [_text(item) for item in value] if isinstance(value, (list, tuple)) else []


def _missing(value) -> bool:
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def _text(value) -> str:
    """A cell as text, in Unicode's composed form (NFC), as Wikipedia and most sources write it:
    "Zoë" typed as "o" and a combining diaeresis is the same name."""
    return "" if _missing(value) else unicodedata.normalize("NFC", str(value).strip())


def _index(value) -> int:
    """A 0-based choice index, also written as text, or a letter label (A is 0, as OpenBookQA
    writes it; ARC's occasional "1"-"4" labels are 1-based and need mapping first); -1 for
    anything else."""
    if _number(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            return int(text)
        if len(text) == 1 and "A" <= text <= "Z":
            return ord(text) - ord("A")
    return -1
