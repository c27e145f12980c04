"""Every source kind reads into the raw facts table; bad data fails early and by name."""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pandas as pd
import pytest

from factft.errors import FactftError
from factft.sources import fetch_url, load_facts, parse_answers, read_entityquestions, read_file, to_facts

POPQA_COLUMNS = {
    "id": "id",
    "question": "question",
    "answers": "possible_answers",
    "subject": "subj",
    "relation": "prop",
}
MMLU_COLUMNS = {
    "question": "question",
    "choices": "choices",
    "answer_index": "answer",
    "subject": "subject",
    "relation": "subject",
}
CUSTOM_COLUMNS = {"question": "prompt", "answers": "gold", "subject": "entity", "relation": "rel"}


def spec(source, name="ds", **extra):
    return {"name": name, "source": source, "format": "open", **extra}


def test_hub_dataset_id_goes_through_load_dataset_and_parses_popqa_answers(data_dir, tmp_path):
    # load_dataset accepts a local folder in the hub's layout in place of a hub id.
    popqa = spec(
        {"hf": str(data_dir / "popqa"), "split": "test"},
        "popqa",
        columns=POPQA_COLUMNS,
        keep_columns=["s_pop"],
    )
    facts = load_facts(popqa, tmp_path / "cache", max_drop_fraction=0.1)
    assert len(facts) == 40
    assert list(facts.columns) == ["id", "question", "answers", "subject", "relation", "s_pop"]
    obama = facts[(facts["subject"] == "Barack Obama") & (facts["relation"] == "place of birth")].iloc[0]
    assert obama["answers"] == ["Honolulu", "Honolulu, Hawaii"]
    assert obama["question"] == "In what city was Barack Obama born?"
    assert obama["id"] == "4000007"
    assert (tmp_path / "cache" / "datasets").is_dir()


def test_hub_tsv_keeps_subjects_that_read_as_missing_values(tmp_path):
    # PopQA is a hub test.tsv: datasets' csv reader would turn "None" and "NA" into missing
    # values (pandas' defaults), and these facts would be dropped as having no subject.
    folder = tmp_path / "hub"
    folder.mkdir()
    rows = [("1", "None", "genre", "What genre is None?", '["rock"]'),
            ("2", "NA", "genre", "What genre is NA?", '["jazz", "NA"]'),
            ("3", "Miles Davis", "genre", "What genre is Miles Davis?", '["jazz"]')]  # fmt: skip
    lines = ["id\tsubj\tprop\tquestion\tpossible_answers"] + ["\t".join(row) for row in rows]
    (folder / "test.tsv").write_text("\n".join(lines) + "\n")
    facts = load_facts(spec({"hf": str(folder)}, "popqa", columns=POPQA_COLUMNS), tmp_path / "cache", 0.0)
    assert list(facts["subject"]) == ["None", "NA", "Miles Davis"]
    assert facts["answers"].iloc[1] == ["jazz", "NA"]


def test_hub_split_that_does_not_exist_names_the_config_key(data_dir, tmp_path):
    popqa = spec({"hf": str(data_dir / "popqa"), "split": "train"}, "popqa", columns=POPQA_COLUMNS)
    with pytest.raises(
        FactftError, match=r"dataset 'popqa': Unknown split \"train\".*datasets\.popqa\.source\.split"
    ):
        load_facts(popqa, tmp_path, max_drop_fraction=0.1)


def test_unreachable_hub_is_one_line_saying_where_to_download_or_what_to_set(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "run the tests with HF_HUB_OFFLINE=1"
    with pytest.raises(FactftError) as caught:
        # An id no local cache holds: with a cached copy, offline loading would succeed.
        load_facts(spec({"hf": "factft-tests/never-cached", "split": "test"}, "popqa"), tmp_path, max_drop_fraction=0.1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("dataset 'popqa': cannot reach the Hugging Face hub (")
    assert "run `snakemake download_datasets` where there is internet, or set datasets.popqa.source.path" in message


@pytest.fixture
def refusing_proxy():
    """A real HTTP proxy on localhost that refuses every request (407), as a cluster's proxy
    does without credentials: hub traffic goes to it, never to the internet."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize(
    "call, expected",
    [
        (
            "from factft.sources import read_hf; read_hf('popqa', {'hf': 'akariasai/PopQA'}, 'cache')",
            "dataset 'popqa': cannot reach the Hugging Face hub (ProxyError: 407 Proxy Authentication Required; "
            "check HTTPS_PROXY and HTTP_PROXY); run `snakemake download_datasets` where there is internet",
        ),
        (
            "from factft.models import download_model; "
            "download_model('llama2-7b', {'hf': 'meta-llama/Llama-2-7b-hf', 'cache_dir': 'hf'}, 'model')",
            "model 'llama2-7b': cannot reach the hub for meta-llama/Llama-2-7b-hf (ProxyError: 407 Proxy "
            "Authentication Required; check HTTPS_PROXY and HTTP_PROXY); run `snakemake download_models`",
        ),
        (
            "from factft.sources import fetch_url; fetch_url('https://example.org/eq.zip', 'cache', attempts=1)",
            "cannot fetch https://example.org/eq.zip: gave up after 1 attempts (ProxyError: ",
        ),
    ],
    ids=["dataset", "model", "url"],
)
def test_a_refusing_proxy_is_a_one_line_error_naming_the_proxy_settings(refusing_proxy, tmp_path, call, expected):
    # Online, in a fresh process: the hub clients read HF_HUB_OFFLINE once, on import.
    offline = {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"}
    env = {k: v for k, v in os.environ.items() if k not in offline and not k.lower().endswith("_proxy")}
    env.update(HTTPS_PROXY=refusing_proxy, HTTP_PROXY=refusing_proxy, HF_HOME=str(tmp_path / "home"))
    code = f"from factft.errors import FactftError\ntry:\n    {call}\nexcept FactftError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(expected), done.stdout
    assert "; check HTTPS_PROXY and HTTP_PROXY" in done.stdout
    # Nothing is left of what was not fetched.
    assert not (tmp_path / "model").exists() and not list((tmp_path / "cache").glob("*eq.zip*"))


def test_mmlu_answer_is_the_choice_at_answer_index_and_hub_config_name_is_used(data_dir, tmp_path):
    mmlu = spec(
        {"hf": str(data_dir / "mmlu"), "name": "all"}, "mmlu", format="multiple_choice", columns=MMLU_COLUMNS
    )
    facts = load_facts(mmlu, tmp_path, max_drop_fraction=0.1)
    assert len(facts) == 12
    assert list(facts.columns) == [
        "id",
        "question",
        "answers",
        "subject",
        "relation",
        "choices",
        "answer_index",
    ]
    first = facts.iloc[0]
    assert first["choices"] == ["joule", "newton", "watt", "pascal"]
    assert first["answer_index"] == 1 and first["answers"] == ["newton"]
    assert first["subject"] == first["relation"] == "high_school_physics"
    assert facts["id"].tolist()[:2] == ["mmlu-0", "mmlu-1"]
    assert facts["answer_index"].dtype == "int64"


def test_entityquestions_zip_recovers_subject_through_the_relation_template(data_dir):
    table = read_entityquestions(data_dir / "entityquestions" / "dataset.zip")
    assert len(table) == 15
    assert sorted(table["relation"].unique()) == ["P17", "P19", "P50"]
    assert sorted(table["source_split"].unique()) == ["dev", "test", "train"]
    row = table[table["question"] == "Where was Sergei Prokofiev born?"].iloc[0]
    assert row["subject"] == "Sergei Prokofiev" and row["relation"] == "P19"
    assert row["answers"] == ["Sontsivka", "Sontsovka"]
    assert "Ōsaka Castle" in set(table["subject"])


def write_zip(path, members):
    import json
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, items in members.items():
            archive.writestr(name, json.dumps(items))


def test_entityquestions_question_outside_its_template_is_named_then_dropped_and_counted(tmp_path, caplog):
    items = [{"question": "Who is Ada?", "answers": ["x"]}, {"question": "Where was Ada born?", "answers": ["y"]},
             {"question": "Where was Bo born?", "answers": ["z"]}]  # fmt: skip
    write_zip(tmp_path / "dataset.zip", {"dataset/test/P19.test.json": items})
    source = {"url": "file://unused", "reader": "entityquestions"}
    with caplog.at_level(logging.WARNING, logger="factft.sources"):
        table = read_entityquestions(tmp_path / "dataset.zip")
    assert "questions that fit no template of their relation, their subject left empty" in caplog.text
    assert "split.max_drop_fraction): 1, the first" in caplog.text
    assert "dataset/test/P19.test.json: 'Who is Ada?'" in caplog.text
    facts = to_facts(table, spec(source, "eq"), max_drop_fraction=0.5)
    assert facts["subject"].tolist() == ["Ada", "Bo"]
    with pytest.raises(FactftError, match=r"dataset 'eq': 1 of 3 rows are invalid \(\{'empty subject': 1\}\)"):
        to_facts(table, spec(source, "eq"), max_drop_fraction=0.1)


def test_entityquestions_relation_without_template_is_an_error(tmp_path):
    write_zip(tmp_path / "dataset.zip", {"dataset/dev/P999.dev.json": [{"question": "Q?", "answers": ["x"]}]})
    with pytest.raises(FactftError, match=r"P999\.dev\.json: relation P999 has no question template"):
        read_entityquestions(tmp_path / "dataset.zip")


def test_config_only_csv_maps_its_own_columns_and_keeps_its_popularity_column(data_dir, tmp_path):
    trivia = spec(
        {"path": str(data_dir / "custom" / "trivia.csv")},
        "trivia",
        columns=CUSTOM_COLUMNS,
        popularity={"scorer": "column", "column": "fame"},
    )
    facts = load_facts(trivia, tmp_path, max_drop_fraction=0.1)
    assert len(facts) == 30
    assert list(facts.columns) == ["id", "question", "answers", "subject", "relation", "fame"]
    vienna = facts[facts["subject"] == "Vienna"].iloc[0]
    assert vienna["answers"] == ["Danube", "Donau"]
    assert facts[facts["subject"] == "Cairo"].iloc[0]["answers"] == ["Nile"]
    # A year read from CSV is still an answer string.
    assert facts[facts["subject"] == "Lego"].iloc[0]["answers"] == ["1932"]


def test_a_dataset_without_a_relation_column_is_one_relation_named_after_it(tmp_path):
    table = pd.DataFrame({"question": ["Who wrote Emma?", "Who wrote Ulysses?"], "answers": [["Austen"], ["Joyce"]],
                          "subject": ["Emma", "Ulysses"]})  # fmt: skip
    facts = to_facts(table, spec({}, "books", columns={"relation": None}), max_drop_fraction=0.1)
    assert list(facts["relation"]) == ["books", "books"]
    with pytest.raises(FactftError, match=r"relation"):  # without the null, the missing column is named
        to_facts(table, spec({}, "books"), max_drop_fraction=0.1)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz"])
def test_every_file_format_reads_the_same_facts(tmp_path, suffix):
    table = pd.DataFrame(
        {
            "question": ["Where is NA?", "Who?"],
            "answers": ['["Namibia", "NA"]', "None"],
            "subject": ["NA", "x"],
            "relation": ["r", "r"],
        }
    )
    path = tmp_path / f"facts.{suffix}"
    if suffix.startswith("csv") or suffix == "tsv":
        table.to_csv(path, sep="\t" if suffix == "tsv" else ",", index=False)
    elif suffix in ("jsonl", "json"):
        table.to_json(path, orient="records", lines=suffix == "jsonl", force_ascii=False)
    else:
        table.to_parquet(path)
    facts = load_facts(spec({"path": str(path)}), tmp_path, max_drop_fraction=0.1)
    assert facts["answers"].tolist() == [["Namibia", "NA"], ["None"]]
    assert facts["subject"].tolist() == ["NA", "x"]
    assert facts["id"].tolist() == ["ds-0", "ds-1"]


def test_answers_parse_from_json_strings_lists_arrays_and_plain_strings():
    import numpy as np

    assert parse_answers('["Paris", " Paris ", "City of Light"]') == ["Paris", "City of Light"]
    assert parse_answers(["Paris", ""]) == ["Paris"]
    assert parse_answers(np.array(["a", "b"], dtype=object)) == ["a", "b"]
    assert parse_answers("Paris") == ["Paris"]
    assert parse_answers("[not json") == ["[not json"]
    assert parse_answers("[citation needed]") == ["[citation needed]"]
    assert parse_answers("['Paris', \"Côte d'Ivoire\", 1969]") == ["Paris", "Côte d'Ivoire", "1969"]  # Python's repr
    assert parse_answers(float("nan")) == [] and parse_answers("[]") == [] and parse_answers(None) == []


def test_a_list_column_written_by_pandas_to_csv_reads_back_as_the_list(tmp_path):
    """pandas writes a list cell as Python's repr: read as text alone it would be one answer
    that no prediction contains."""
    table = pd.DataFrame(
        {"question": ["Capital of France?", "Capital of Peru?"], "answers": [["Paris", "City of Light"], ["Lima"]],
         "subject": ["France", "Peru"], "relation": ["capital", "capital"]}
    )  # fmt: skip
    table.to_csv(tmp_path / "facts.csv", index=False)
    facts = load_facts(spec({"path": str(tmp_path / "facts.csv")}), tmp_path, max_drop_fraction=0.1)
    assert facts["answers"].tolist() == [["Paris", "City of Light"], ["Lima"]]


def test_missing_mapped_column_names_dataset_and_column_and_lists_the_columns(data_dir, tmp_path):
    columns = dict(CUSTOM_COLUMNS, answers="golds")
    trivia = spec({"path": str(data_dir / "custom" / "trivia.csv")}, "trivia", columns=columns)
    with pytest.raises(
        FactftError,
        match=r"dataset 'trivia': column 'golds' named in datasets\.trivia\.columns\.answers is missing.*"
        r"\['prompt', 'gold', 'entity', 'rel', 'fame'\]",
    ):
        load_facts(trivia, tmp_path, max_drop_fraction=0.1)


def test_missing_keep_column_is_named(tmp_path):
    table = pd.DataFrame({"question": ["q"], "answers": [["a"]], "subject": ["s"], "relation": ["r"]})
    with pytest.raises(FactftError, match=r"column 'views' named in datasets\.ds\.keep_columns is missing"):
        to_facts(table, spec({}, keep_columns=["views"]), max_drop_fraction=0.1)
    pageviews = {"scorer": "pageviews", "title_column": "wiki_title"}
    with pytest.raises(FactftError, match=r"column 'wiki_title' named in datasets\.ds\.popularity\.title_column"):
        to_facts(table, spec({}, popularity=pageviews), max_drop_fraction=0.1)


def test_the_column_a_scorer_reads_is_kept_without_being_listed(data_dir, tmp_path):
    popqa = spec(
        {"hf": str(data_dir / "popqa"), "split": "test"},
        "popqa",
        columns=POPQA_COLUMNS,
        popularity={"scorer": "pageviews", "title_column": "s_wiki_title"},
    )
    facts = load_facts(popqa, tmp_path / "cache", max_drop_fraction=0.1)
    assert list(facts.columns) == ["id", "question", "answers", "subject", "relation", "s_wiki_title"]
    assert "Barack Obama" in set(facts["s_wiki_title"])


def facts_table(n):
    return pd.DataFrame(
        {
            "question": [f"Where was p{i} born?" for i in range(n)],
            "answers": [[f"city{i}"] for i in range(n)],
            "subject": [f"p{i}" for i in range(n)],
            "relation": ["born"] * n,
        }
    )


def test_rows_without_question_or_answers_are_dropped_and_counted_in_the_log(caplog):
    table = facts_table(20)
    table.loc[3, "question"] = "  "
    table.at[7, "answers"] = []
    with caplog.at_level(logging.INFO, logger="factft"):
        facts = to_facts(table, spec({}), max_drop_fraction=0.1)
    assert len(facts) == 18
    assert "ds-3" not in set(facts["id"]) and "ds-7" not in set(facts["id"])
    assert "dropping 1 rows: empty question" in caplog.text
    assert "dropping 1 rows: no answers" in caplog.text
    assert "kept 18 of 20 rows" in caplog.text


def test_dropping_more_than_max_drop_fraction_is_an_error():
    table = facts_table(10)
    table.loc[[1, 2], "answers"] = pd.Series([[], []], index=[1, 2])
    with pytest.raises(
        FactftError, match=r"2 of 10 rows are invalid \(\{'no answers': 2\}\).*split\.max_drop_fraction 0\.1"
    ):
        to_facts(table, spec({}), max_drop_fraction=0.1)


def test_duplicate_ids_are_an_error_naming_the_id_column():
    table = facts_table(4).assign(key=["a", "b", "a", "c"])
    with pytest.raises(FactftError, match=r"1 duplicate ids in column 'key', e\.g\. \['a'\].*columns\.id"):
        to_facts(table, spec({}, columns={"id": "key"}), max_drop_fraction=0.1)


def test_generated_ids_number_the_source_rows_and_survive_dropping():
    table = facts_table(12)
    table.at[0, "answers"] = []
    facts = to_facts(table, spec({}, name="eq"), max_drop_fraction=0.1)
    assert facts["id"].tolist() == [f"eq-{i}" for i in range(1, 12)]


@pytest.mark.parametrize("content", [None, b"PAR1 this is not parquet"])
def test_unreadable_or_missing_file_names_its_path(tmp_path, content):
    path = tmp_path / "broken.parquet"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FactftError, match=rf"cannot read {path}"):
        read_file(path)


def test_unknown_file_type_lists_the_known_ones(tmp_path):
    (tmp_path / "facts.xlsx").write_bytes(b"x")
    with pytest.raises(FactftError, match=r"unknown file type '\.xlsx'.*'\.jsonl'"):
        read_file(tmp_path / "facts.xlsx")


def test_url_source_is_fetched_with_retries_checked_and_then_read_from_the_cache(
    http_server, data_dir, tmp_path
):
    archive = (data_dir / "entityquestions" / "dataset.zip").read_bytes()
    http_server.reply("/eq/dataset.zip", (503, "busy"), (200, archive))
    source = {
        "url": f"{http_server.url}/eq/dataset.zip",
        "sha256": hashlib.sha256(archive).hexdigest(),
        "reader": "entityquestions",
    }
    eq = spec(source, "entityquestions")
    facts = load_facts(eq, tmp_path, max_drop_fraction=0.1)
    assert len(facts) == 15 and http_server.requests == ["/eq/dataset.zip"] * 2
    assert load_facts(eq, tmp_path, max_drop_fraction=0.1).equals(facts)
    assert len(http_server.requests) == 2, "the second load must come from the cache"


def test_url_with_wrong_checksum_is_an_error_and_nothing_is_cached(http_server, tmp_path):
    http_server.reply("/facts.csv", (200, "question,answers,subject,relation\nq,a,s,r\n"))
    with pytest.raises(FactftError, match=r"facts\.csv: sha256 is [0-9a-f]{64}, the config says 0{64}"):
        fetch_url(f"{http_server.url}/facts.csv", tmp_path, "0" * 64, backoff=0.01)
    assert list(tmp_path.iterdir()) == []


def test_url_that_keeps_failing_gives_up_after_bounded_attempts(http_server, tmp_path):
    http_server.reply("/facts.csv", (500, "down"))
    with pytest.raises(FactftError, match=r"gave up after 3 attempts \(HTTP 500\)"):
        fetch_url(f"{http_server.url}/facts.csv", tmp_path, attempts=3, backoff=0.01)
    assert len(http_server.requests) == 3


def test_multiple_choice_reads_lists_as_text_and_letters_and_drops_rows_with_empty_or_repeated_choices(caplog):
    # A csv written by pandas holds Python's list repr; ARC-style answer keys are letters.
    table = pd.DataFrame(
        {
            "question": [f"q{i}" for i in range(7)],
            "choices": [["a", "b", "c"], "['a', 'b', 'c']", '["a", "b", "c"]', ["a", "", "c"], ["a", "b", "a"],
                        "a; b; c", ["a", "b", "c"]],
            "answer": [2, "B", "0", 1, 2, 0, 1.5],
        }
    )  # fmt: skip
    columns = {"choices": "choices", "answer_index": "answer", "subject": "question", "relation": "question"}
    with caplog.at_level(logging.INFO, logger="factft"):
        facts = to_facts(table, spec({}, format="multiple_choice", columns=columns), max_drop_fraction=0.6)
    assert facts["choices"].tolist() == [["a", "b", "c"]] * 3
    assert facts["answers"].tolist() == [["c"], ["b"], ["a"]] and facts["answer_index"].tolist() == [2, 1, 0]
    for reason in ("an empty choice", "a choice repeated", "choices missing, unreadable or fewer than 2",
                   "answer_index missing or outside choices"):  # fmt: skip
        assert f"dropping 1 rows: {reason}" in caplog.text


def test_answer_cells_that_look_like_unread_lists_are_warned_about(caplog):
    table = facts_table(20)
    table["answers"] = [f'["city{i}", "c{i}"]' for i in range(20)]  # JSON lists, as written in a csv
    table.at[0, "answers"] = "Rock; Pop"  # one answer with a ; in a twentieth of the rows is no pattern
    table.at[1, "answers"] = "[citation needed]"  # brackets, but no list
    with caplog.at_level(logging.WARNING, logger="factft"):
        assert to_facts(table, spec({}), max_drop_fraction=0.1)["answers"][2] == ["city2", "c2"]
    assert "look like lists" not in caplog.text
    table["answers"] = [f"city{i}|c{i}" for i in range(20)]  # a |-joined export
    table.at[5, "answers"] = '["city5", "c5"'  # a cut-off list
    with caplog.at_level(logging.WARNING, logger="factft"):
        assert to_facts(table, spec({}), max_drop_fraction=0.1)["answers"][0] == ["city0|c0"]  # as README says
    message = "dataset 'ds': 20 answer cells of column 'answers' look like lists but are read as one answer each"
    assert f"{message} (e.g. 'city0|c0'); write several answers as a JSON list" in caplog.text


def test_a_row_repeating_an_earlier_rows_fact_is_dropped(caplog):
    table = pd.concat([facts_table(10), facts_table(10).iloc[[3, 3, 5, 7]]], ignore_index=True)
    table.at[11, "answers"] = ["elsewhere"]  # the same question with another answer is another fact
    # Filed under another subject, the same question and answer is still the same example: kept,
    # it could be held out while its twin is finetuned on.
    table.at[12, "subject"] = "another topic"
    # In other case and spacing, the same prompt and aliases.
    table.at[13, "question"] = "  " + table.at[13, "question"].upper()
    table.at[13, "answers"] = [answer.lower() for answer in table.at[13, "answers"]]
    with caplog.at_level(logging.INFO, logger="factft"):
        facts = to_facts(table, spec({}), max_drop_fraction=0.2)
    assert facts["id"].tolist() == [f"ds-{i}" for i in range(10)] + ["ds-11"]
    assert "dropping 3 rows that repeat an earlier row's" in caplog.text
    # The question asked again with another answer is kept, and said.
    question = table.at[3, "question"]
    assert (
        f"dataset 'ds': 1 question(s) asked again with other answers, in 2 rows (e.g. {question!r}: "
        f"{list(table.at[3, 'answers'])} / ['elsewhere'])" in caplog.text
    )
    # With several such questions the example is one question's rows, not every group's.
    many = pd.concat([facts_table(10), facts_table(10).assign(answers=[[f"other{i}"] for i in range(10)])])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="factft"):
        to_facts(many.reset_index(drop=True), spec({}), max_drop_fraction=0.1)
    first = many["question"].iloc[0]
    assert f"10 question(s) asked again with other answers, in 20 rows (e.g. {first!r}: " in caplog.text
    assert f"{list(many['answers'].iloc[0])} / ['other0']); each row" in caplog.text


def test_facts_that_all_share_one_subject_are_refused_before_their_popularity_is_scored():
    # MMLU's subject is its topic: one topic alone is one subject, and the split holds out subjects.
    table = facts_table(10).assign(topic="world history")
    with pytest.raises(FactftError, match=r"every fact has the subject \['world history'\] \(source column 'topic', "
                       r"datasets\.ds\.columns\.subject\)"):  # fmt: skip
        to_facts(table, spec({}, columns={"subject": "topic"}), max_drop_fraction=0.1)
    # As config.yaml suggests for one MMLU topic: each question its own subject, the topic its relation.
    facts = to_facts(table, spec({}, columns={"subject": "question", "relation": "topic"}), max_drop_fraction=0.1)
    assert facts["subject"].nunique() == 10 and set(facts["relation"]) == {"world history"}


def test_answer_index_outside_the_choices_drops_the_row():
    table = pd.DataFrame(
        {"question": [f"q{i}" for i in range(10)], "choices": [["a", "b"]] * 10, "answer": [0] * 9 + [5]}
    )
    columns = {"choices": "choices", "answer_index": "answer", "subject": "question", "relation": "question"}
    facts = to_facts(table, spec({}, format="multiple_choice", columns=columns), max_drop_fraction=0.1)
    assert len(facts) == 9 and "ds-9" not in set(facts["id"])


def test_local_copy_of_the_entityquestions_zip_reads_as_a_path_source(data_dir, tmp_path):
    facts = load_facts(spec({"path": str(data_dir / "entityquestions" / "dataset.zip")}, "eq"), tmp_path, 0.1)
    assert len(facts) == 15 and facts["id"].iloc[0] == "eq-0"
    assert set(facts["relation"]) == {"P17", "P19", "P50"}


def test_a_repeat_is_the_same_question_and_aliases_in_any_order_and_a_mass_of_them_is_a_mapping_error(caplog):
    table = facts_table(10)
    table.at[0, "answers"] = ["Shakespeare", "William Shakespeare"]
    repeat = table.iloc[[0]].assign(answers=[["William Shakespeare", "Shakespeare"]], subject="Hamlet (play)")
    facts = to_facts(pd.concat([table, repeat], ignore_index=True), spec({}), max_drop_fraction=0.1)
    assert len(facts) == 10  # else one could be held out and its twin finetuned on
    # A template mapped as the question: all but a few rows repeat one another.
    template = facts_table(10).assign(question="Where was X born?", answers=[["Lyon"], ["Paris"]] * 5)
    with pytest.raises(FactftError, match=r"dataset 'ds': 8 of 10 rows repeat an earlier row's question and "
                       r"answers; check that datasets\.ds\.columns\.question names each fact's own"):  # fmt: skip
        to_facts(template, spec({}), max_drop_fraction=0.1)
    some = pd.concat([facts_table(10), facts_table(10).iloc[:3]], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="factft"):
        assert len(to_facts(some, spec({}), max_drop_fraction=0.1)) == 10
    assert "3 of 13 rows repeat an earlier row's question and answers" in caplog.text


def test_a_missing_id_is_dropped_and_names_are_compared_in_one_unicode_form():
    table = facts_table(12).assign(key=[f"k{i}" for i in range(11)] + [None])
    table.at[1, "subject"], table.at[2, "subject"] = "Zoe\u0308 Smith", "Zo\u00eb Smith"  # decomposed; composed
    facts = to_facts(table, spec({}, columns={"id": "key"}), max_drop_fraction=0.1)
    assert facts["id"].tolist() == [f"k{i}" for i in range(11)]  # not "nan"
    assert facts["subject"].iloc[1] == facts["subject"].iloc[2] == "Zo\u00eb Smith"


def test_a_kept_column_mixing_text_and_numbers_is_kept_as_text_and_scored_where_numeric(tmp_path):
    from factft.popularity import ScoringContext, add_popularity

    path = tmp_path / "facts.jsonl"
    rows = [{"question": f"q{i}", "answers": [f"a{i}"], "subject": f"s{i}", "relation": "r", "views": i}
            for i in range(20)]  # fmt: skip
    rows[3]["views"] = "n/a"
    path.write_text("\ufeff" + "\n".join(json.dumps(row) for row in rows))  # with a byte-order mark
    raw = load_facts(spec({"path": str(path)}, keep_columns=["views"]), tmp_path, max_drop_fraction=0.1)
    assert raw["views"].tolist()[2:5] == ["2", "n/a", "4"]
    facts = add_popularity(raw, {"scorer": "column", "column": "views"}, ScoringContext("ds"), 0.1)
    assert len(facts) == 19 and facts["popularity"].iloc[3] == 4.0
    # A source column named popularity can be the one scored: the score takes its place.
    scored = to_facts(facts_table(10).assign(popularity=range(10)), spec({}, popularity={"scorer": "column",
                      "column": "popularity"}), max_drop_fraction=0.1)  # fmt: skip
    facts = add_popularity(scored, {"scorer": "column", "column": "popularity"}, ScoringContext("ds"), 0.1)
    assert facts["popularity"].tolist() == [float(i) for i in range(10)]


def test_json_errors_name_the_line_and_a_json_lines_file_named_json_says_so(tmp_path):
    lines = [json.dumps({"question": f"q{i}"}) for i in range(10)]
    lines[6] = lines[6][:-3]
    (tmp_path / "facts.jsonl").write_text("\n".join(lines))
    with pytest.raises(FactftError, match=r"facts\.jsonl: line 7, column \d+: "):
        read_file(tmp_path / "facts.jsonl")
    (tmp_path / "facts.json").write_text("\n".join(json.dumps({"question": f"q{i}"}) for i in range(3)))
    with pytest.raises(FactftError, match=r"Extra data.*one record a line is JSON Lines: name the file \.jsonl"):
        read_file(tmp_path / "facts.json")


def test_a_url_without_a_file_name_needs_its_reader_named(http_server, tmp_path):
    http_server.reply("/download?id=3", (200, "question,answers,subject,relation\nq1,a,s1,r\nq2,b,s2,r\n"))
    source = {"url": f"{http_server.url}/download?id=3"}
    with pytest.raises(FactftError, match=r"datasets\.ds\.source: cannot tell the kind of file .*/download\?id=3 "
                       r"from its name; factft reads csv, tsv, jsonl, json, parquet \(also \.gz\)"):  # fmt: skip
        load_facts(spec(source), tmp_path, max_drop_fraction=0.1)
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())  # nothing fetched
    facts = load_facts(spec({**source, "reader": "csv"}), tmp_path, max_drop_fraction=0.1)
    assert facts["question"].tolist() == ["q1", "q2"]


def test_a_local_file_of_another_name_is_read_as_its_reader_says(tmp_path):
    (tmp_path / "facts.txt").write_text("question\tanswers\tsubject\trelation\nq1\ta\ts1\tr\nq2\tb\ts2\tr\n")
    source = {"path": str(tmp_path / "facts.txt")}
    with pytest.raises(FactftError, match=r"set datasets\.ds\.source\.reader to the kind it is"):
        load_facts(spec(source), tmp_path, max_drop_fraction=0.1)
    facts = load_facts(spec({**source, "reader": "tsv"}), tmp_path, max_drop_fraction=0.1)
    assert facts["answers"].map(list).tolist() == [["a"], ["b"]]


def test_a_field_of_a_nested_column_is_mapped_by_its_dotted_name(tmp_path):
    """Hub datasets nest fields: TriviaQA's answer.aliases, ARC's choices.text."""
    trivia = pd.DataFrame(
        {
            "question": [f"Who wrote book {i}?" for i in range(10)],
            "answer": [{"aliases": [f"Author {i}", f"A. {i}"], "value": f"Author {i}"} for i in range(10)],
            "meta": [{"entity": f"Book {i}", "kind": "author"} for i in range(10)],
        }
    )
    trivia.to_parquet(tmp_path / "trivia.parquet")  # struct columns, as the hub stores them
    nested = {"answers": "answer.aliases", "subject": "meta.entity", "relation": "meta.kind"}
    facts = load_facts(spec({"path": str(tmp_path / "trivia.parquet")}, columns=nested), tmp_path, 0.1)
    assert facts["answers"].map(list).iloc[3] == ["Author 3", "A. 3"] and facts["subject"].iloc[3] == "Book 3"
    arc = pd.DataFrame(
        {
            "question": [f"Which is {i}?" for i in range(10)],
            "choices": [{"text": ["red", "blue", f"n{i}"], "label": ["A", "B", "C"]} for i in range(10)],
            "answerKey": ["C"] * 10,
            "id": [f"arc-{i}" for i in range(10)],
        }
    )
    arc.to_parquet(tmp_path / "arc.parquet")
    columns = {"choices": "choices.text", "answer_index": "answerKey", "subject": "id", "relation": "question"}
    facts = load_facts(spec({"path": str(tmp_path / "arc.parquet")}, format="multiple_choice", columns=columns),
                       tmp_path, 0.1)  # fmt: skip
    assert facts["choices"].iloc[0] == ["red", "blue", "n0"] and facts["answers"].iloc[0] == ["n0"]
    with pytest.raises(FactftError, match=r"column 'answer' has no field 'alias' \(named in datasets\.ds\.columns\."
                       r"answers\); its first value: \{'aliases'"):  # fmt: skip
        load_facts(spec({"path": str(tmp_path / "trivia.parquet")}, columns={**nested, "answers": "answer.alias"}),
                   tmp_path, 0.1)  # fmt: skip
