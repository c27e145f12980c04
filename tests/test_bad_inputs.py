"""A catalogue of bad inputs (config, data, environment): each stops with one clear message,
before any expensive work, and changes no result that already exists.

Every case runs in a copy of a small workflow tree (a raw table, facts, splits, a model, a
finetuned adapter, metrics) and calls what the rule's script calls, writing where the rule
writes; the files of the tree are hashed before and after.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake.exceptions import WorkflowError

from factft.config import finetune_settings, load_config
from factft.errors import FactftError
from factft.models import download_model, load_model
from factft.popularity import ScoringContext, add_popularity
from factft.sources import load_facts
from factft.split import split_facts
from factft.tables import read_table, write_table
from factft.train import finetune, prepare_model

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("results/tiny/synth/top/seed0")
PROMPT = {"template": "Q: {question} A:", "answer": " {answer}"}


def make_facts() -> pd.DataFrame:
    """12 facts about 6 subjects, in the words of conftest's tiny model."""
    people = ["Ilmo Varsk", "Bera Tosk", "Kalo Mirr", "Suna Dee", "Ito Rask", "Vena Lu"]
    towns, jobs = ["Lyon", "Paris", "Rome", "Oslo", "Milan", "Lyon"], ["doctor", "baker", "pilot"] * 2
    rows = []
    for i, (who, town, job) in enumerate(zip(people, towns, jobs)):
        rows.append((f"b{i}", f"Where was {who} born ?", [town], who, "born", 60.0 - i))
        rows.append((f"w{i}", f"What does {who} do ?", [job], who, "works", 30.0 - i))
    return pd.DataFrame(rows, columns=["id", "question", "answers", "subject", "relation", "popularity"])


@dataclass
class Tree:
    root: Path
    model: dict  # model_spec of resources/models/tiny

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir) -> Path:
    """The workflow tree every case starts from, built once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tree")
    facts = make_facts()
    write_table(facts.drop(columns="popularity"), root / "resources/datasets/myqa/raw.parquet")
    write_table(facts, root / "results/synth/facts.parquet")
    for name, table in split_facts(facts, dataset="synth", test_fraction=0.34, seed=0).items():
        write_table(table, root / f"results/synth/splits/{name}.parquet")
    shutil.copytree(tiny_model_dir, root / "resources/models/tiny")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2))
    lora.save_pretrained(root / RUN / "adapter")
    (root / RUN / "metrics.tsv").write_text("scope\tx\tn\taccuracy\nall\t100\t4\t0.5\n")
    # A user's note where a dataset's results folder would go.
    (root / "results/popqa").write_text("notes\n")
    return root


@pytest.fixture
def tree(template, tmp_path, monkeypatch) -> Tree:
    root = tmp_path / "tree"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    spec = {"name": "tiny", "path": str(root / "resources/models/tiny"), "gguf_file": None, "trust_remote_code": False}
    return Tree(root, spec)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---- actions: what a rule's script does with a bad input ---------------------------------


def config_with(change: Callable[[dict], None]) -> Callable[[Tree], None]:
    """Load the demo config, changed, the way the Snakefile does (schema, then cross-checks)."""

    def action(tree: Tree) -> None:
        config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
        change(config)
        path = tree.path("config.yaml")
        path.write_text(yaml.safe_dump(config))
        load_config(path)

    return action


def add_dataset(**entry) -> Callable[[dict], None]:
    return lambda config: config["datasets"].update(myqa=entry)


def source_file(name: str, content: bytes, *, max_drop_fraction: float = 0.1, **spec) -> Callable[[Tree], None]:
    """The `download` rule on a local source file: read, map columns, write the raw table."""

    def action(tree: Tree) -> None:
        tree.path(name).write_bytes(content)
        entry = {"name": "myqa", "source": {"path": name}, "format": "open", **spec}
        write_table(load_facts(entry, "resources/hf", max_drop_fraction), "resources/datasets/myqa/raw.parquet")

    return action


CSV_COLUMNS = {"question": "q", "answers": "a", "subject": "s", "relation": "r"}


def scored(column_values: list, *, max_drop_fraction: float = 0.1) -> Callable[[Tree], None]:
    """The `popularity` rule with the column scorer over `column_values`."""

    def action(tree: Tree) -> None:
        raw = read_table("resources/datasets/myqa/raw.parquet").assign(fame=column_values)
        context = ScoringContext(dataset="myqa")
        facts = add_popularity(raw, {"scorer": "column", "column": "fame"}, context, max_drop_fraction)
        write_table(facts, "results/synth/facts.parquet")

    return action


def split_with(facts: Callable[[], pd.DataFrame], **split) -> Callable[[Tree], None]:
    """The `split` and `subset` rules, writing over the tree's split files only on success."""

    def action(tree: Tree) -> None:
        for name, table in split_facts(facts(), dataset="synth", **split).items():
            write_table(table, f"results/synth/splits/{name}.parquet")

    return action


def finetuned(adapter: str = "results/tiny/synth/top/seed1/adapter", *, model: str | None = None, **change):
    """The `finetune` rule on the top split (with the demo's finetune block, changed)."""

    def action(tree: Tree) -> None:
        config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
        settings = dict(config["finetune"], max_steps=2, **change)
        settings = dict(finetune_settings({"finetune": settings, "models": {"tiny": {}}}, "tiny"), seed=1)
        spec = dict(tree.model, path=model) if model else tree.model
        examples = read_table("results/synth/splits/top.parquet")
        run = Path(adapter).parent
        finetune(spec, examples, adapter, settings, PROMPT, run / "checkpoints", train_log=run / "train_log.tsv")

    return action


def without_module(name: str, action: Callable[[Tree], None]) -> Callable[[Tree], None]:
    """`action` on a machine where `import name` fails (a None entry in sys.modules does that)."""

    def run(tree: Tree) -> None:
        saved = {k: v for k, v in sys.modules.items() if k == name or k.startswith(name + ".")}
        for key in saved:
            del sys.modules[key]
        sys.modules[name] = None
        try:
            action(tree)
        finally:
            del sys.modules[name]
            sys.modules.update(saved)

    return run


def model_folder(*files: str) -> Callable[[Tree], None]:
    """Loading a model from a folder holding only `files` of the tiny model (a pytorch_model.bin
    is its weights, pickled) for evaluate, popularity or finetune."""

    def action(tree: Tree) -> None:
        import torch
        from safetensors.torch import load_file

        tiny, folder = tree.path("resources/models/tiny"), tree.path("elsewhere/model")
        folder.mkdir(parents=True)
        for name in files:
            if name == "pytorch_model.bin":
                torch.save(load_file(tiny / "model.safetensors"), folder / name)
            else:
                shutil.copy(tiny / name, folder / name)
        load_model(dict(tree.model, path=str(folder)), device="cpu")

    return action


def adapter_with_only_pickled_weights(tree: Tree) -> None:
    import torch
    from safetensors.torch import load_file

    adapter = tree.path("elsewhere/adapter")
    adapter.mkdir(parents=True)
    shutil.copy(tree.path(RUN / "adapter/adapter_config.json"), adapter)
    torch.save(load_file(tree.path(RUN / "adapter/adapter_model.safetensors")), adapter / "adapter_model.bin")
    load_model(tree.model, adapter, device="cpu")


def unknown_lora_target(tree: Tree) -> None:
    model, _ = load_model(tree.model, device="cpu", for_training=True)
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["qkv_proj"]}
    prepare_model(model, {"method": "lora", "lora": lora})


def hub_dataset_offline(tree: Tree) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    entry = {"name": "myqa", "source": {"hf": "factft-test/not-cached"}, "format": "open"}
    write_table(load_facts(entry, "resources/hf", 0.1), "resources/datasets/myqa/raw.parquet")


def hub_model_offline(tree: Tree) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    download_model("llama", {"hf": "factft-test/not-cached", "cache_dir": "resources/hf"}, "resources/models/llama")


def corrupt_table(tree: Tree) -> None:
    tree.path("elsewhere").mkdir()
    tree.path("elsewhere/facts.parquet").write_bytes(tree.path("results/synth/facts.parquet").read_bytes()[:100])
    split_with(lambda: read_table("elsewhere/facts.parquet"))(tree)


def write_where_a_folder_is_a_file(tree: Tree) -> None:
    write_table(make_facts(), "results/popqa/facts.parquet")


def empty_split_to_finetune(tree: Tree) -> None:
    config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    settings = dict(config["finetune"], max_steps=2, seed=1)
    examples = read_table("results/synth/splits/top.parquet").head(0)
    run = Path("results/tiny/synth/top/seed1")
    finetune(tree.model, examples, run / "adapter", settings, PROMPT, run / "checkpoints")


LATIN1_CSV = "q,a,s,r\nWhere was Zoë born?,Lyon,Zoë,born\n".encode("latin-1")
GOOD_CSV = b"q,a,s,r\nWhere was Ito born?,Lyon,Ito,born\nWhere was Lu born?,Rome,Lu,born\n"


# ---- the catalogue ----------------------------------------------------------------------
# (id, action, what the message must contain: its stable part, naming the problem and the fix;
#  for a schema error, also the key, which Snakemake names on a line of its own)

CATALOGUE = [
    # config: types and ranges
    ("config-type-epochs-is-text", config_with(lambda c: c["finetune"].update(epochs="three")),
     "finetune.epochs: 'three' is not of type 'number'"),
    ("config-type-seeds-not-a-list", config_with(lambda c: c.update(seeds=0)),
     "seeds: 0 is not of type 'array'"),
    ("config-range-negative-seed", config_with(lambda c: c.update(seeds=[-1])),
     "seeds.0: -1 is less than the minimum of 0"),
    ("config-range-test-fraction-one", config_with(lambda c: c["split"].update(test_fraction=1)),
     "split.test_fraction: 1 is greater than or equal to the maximum of 1"),
    ("config-range-percentile-over-100", config_with(lambda c: c["evaluate"].update(percentiles=[50, 150])),
     "evaluate.percentiles.1: 150 is greater than the maximum of 100"),
    ("config-subsets-the-whole-pool", config_with(lambda c: c["split"].update(fraction=1)),
     "split.fraction: 1 is greater than or equal to the maximum of 1"),
    ("config-hidden-size-not-a-multiple-of-heads",
     config_with(lambda c: c["models"]["tiny"]["source"]["pretrain"].update(hidden_size=130)),
     "models.tiny.source.pretrain: hidden_size must be a multiple of heads"),
    ("config-chat-on-a-model-pretrained-here", config_with(lambda c: c["models"]["tiny"].update(chat=True)),
     "models.tiny.chat: a model pretrained here has no chat template; set it false"),
    ("config-chat-template-kwargs-without-chat",
     config_with(lambda c: c["models"]["tiny"].update(chat_template_kwargs={"enable_thinking": False})),
     "models.tiny.chat_template_kwargs: the chat template is used only with models.tiny.chat: true"),
    ("config-system-prompt-without-chat",
     config_with(lambda c: c["models"]["tiny"].update(system_prompt="Answer briefly.")),
     "models.tiny.system_prompt: the chat template is used only with models.tiny.chat: true"),
    ("config-a-model-held-in-4-bits-without-qlora", config_with(lambda c: c["models"]["tiny"].update(quantize="nf4")),
     "models.tiny.quantize: the model is held in 4 bits, so its finetunes are QLoRA, but finetune.method is 'lora' "
     "for dataset 'synth'; set models.tiny.finetune.method: qlora"),
    ("config-qlora-of-a-gguf-model",
     config_with(lambda c: c["models"].update(smol={"source": {"path": "m", "gguf_file": "m.gguf"},
                                                    "finetune": {"method": "qlora"}})),
     "models.smol.source.gguf_file: transformers does not quantize a model read from GGUF, so finetune.method qlora "
     "(dataset 'synth') cannot load it; use method lora, or a safetensors copy of the model (source.path)"),
    # config: unknown names
    ("config-unknown-key", config_with(lambda c: c.update(seedz=[1])),
     "Additional properties are not allowed ('seedz' was unexpected)"),
    ("config-unknown-scorer", config_with(lambda c: c["datasets"]["synth"]["popularity"].update(scorer="wikipedia")),
     "datasets.synth.popularity.scorer: 'wikipedia' is not one of "
     "['column', 'pageviews', 'model_confidence', 'pretraining_count']"),
    ("config-unknown-scoring-model",
     config_with(add_dataset(source={"path": "myqa.csv"}, popularity={"scorer": "model_confidence", "model": "gpt9"})),
     "datasets.myqa.popularity.model: 'gpt9' is not a configured model; models are: ['tiny']"),
    ("config-scoring-model-of-another-world",
     config_with(add_dataset(source={"path": "myqa.csv"},
                             popularity={"scorer": "model_confidence", "model": "tiny"})),
     "datasets.myqa.popularity.model: 'tiny' is pretrained on another world and cannot read this dataset's "
     "questions; name a hub model"),
    ("config-unknown-finetune-method-per-model",
     config_with(lambda c: c["models"]["tiny"].update(finetune={"method": "dora"})),
     "models.tiny.finetune.method: 'dora' is not one of ['lora', 'qlora', 'full']"),
    ("config-pretrain-on-a-dataset-that-is-not-synthetic",
     config_with(lambda c: (add_dataset(source={"path": "myqa.csv"}, popularity={"scorer": "column", "column": "v"})(c),
                            c["models"]["tiny"]["source"]["pretrain"].update(dataset="myqa"))),
     "models.tiny.source.pretrain.dataset: 'myqa' is not a synthetic dataset; synthetic datasets are: ['synth']"),
    ("config-a-token-in-the-config", config_with(lambda c: c["models"]["tiny"]["source"].update(token="hf_x")),
     "models.tiny.source: Additional properties are not allowed ('token' was unexpected)"),
    ("config-unknown-lora-target-module", unknown_lora_target,
     "finetune.lora.target_modules ['qkv_proj']: Target modules {'qkv_proj'} not found in the base model"),
    # config: unsafe names (they become paths)
    ("config-unsafe-dataset-name", config_with(lambda c: c["datasets"].update({"../up": c["datasets"].pop("synth")})),
     "datasets: '../up' does not match '^[A-Za-z0-9][A-Za-z0-9_-]*$'"),
    ("config-unsafe-model-name", config_with(lambda c: c["models"].update({"org/tiny": c["models"].pop("tiny")})),
     "models: 'org/tiny' does not match '^[A-Za-z0-9][A-Za-z0-9_-]*$'"),
    # config meets data: sizes
    ("split-empty-subsets", split_with(make_facts, fraction=0.2, test_fraction=0.34),
     "dataset 'synth': split.fraction 0.2 of a pool of 8 facts within each relation (split.stratify: relation) "
     "leaves top, bottom and random empty; raise split.fraction, or split.pool_size where it caps the pool"),
    ("split-one-subject", split_with(lambda: make_facts().assign(subject="Ito")),
     "dataset 'synth': 1 subject(s); a subject-disjoint split needs 2 or more"),
    ("empty-dataset-after-filtering",
     source_file("myqa.csv", b"q,a,s,r\nWhere was Ito born?,,Ito,born\nWhere was Lu born?,,Lu,born\n",
                 columns=CSV_COLUMNS, max_drop_fraction=1.0),
     "dataset 'myqa': all 2 rows are invalid ({'no answers': 2}), nothing is left; check the column mapping"),
    ("finetune-on-an-empty-split", empty_split_to_finetune,
     "finetune examples: the split is empty; check split.fraction and pool_size"),
    # data
    ("data-missing-column", source_file("myqa.csv", GOOD_CSV, columns=dict(CSV_COLUMNS, answers="gold")),
     "dataset 'myqa': column 'gold' named in datasets.myqa.columns.answers is missing from the source; "
     "its columns are: ['q', 'a', 's', 'r']"),
    ("data-missing-default-column",
     source_file("myqa.csv", GOOD_CSV, columns={k: v for k, v in CSV_COLUMNS.items() if k != "relation"}),
     "column 'relation' named in datasets.myqa.columns.relation (its default name) is "
     "missing from the source; its columns are: ['q', 'a', 's', 'r']"),
    ("data-semicolon-separated", source_file("myqa.csv", GOOD_CSV.replace(b",", b";"), columns=CSV_COLUMNS),
     "its columns are: ['q;a;s;r']; the file looks ';'-separated, which its kind does not read"),
    ("config-pageviews-days-in-the-wrong-order",
     config_with(add_dataset(source={"path": "myqa.csv"},
                             popularity={"scorer": "pageviews", "start": "20231231", "end": "20230101"})),
     "datasets.myqa.popularity.start 20231231 is after datasets.myqa.popularity.end 20230101"),
    ("config-pageviews-day-that-is-none",
     config_with(add_dataset(source={"path": "myqa.csv"}, popularity={"scorer": "pageviews", "start": "20231340"})),
     "datasets.myqa.popularity.start: '20231340' is no day (YYYYMMDD, such as 20230101)"),
    ("config-choices-of-an-open-dataset",
     config_with(add_dataset(source={"path": "myqa.csv"}, columns={"choices": "options"},
                             popularity={"scorer": "column", "column": "v"})),
     "datasets.myqa.columns.choices: format open does not read it (its answers come from answers); remove it, "
     "or set datasets.myqa.format to the dataset's format"),
    ("data-an-empty-file", source_file("myqa.csv", b"", columns=CSV_COLUMNS),
     "cannot read myqa.csv: the file is empty"),
    ("data-a-header-and-no-rows", source_file("myqa.csv", b"q,a,s,r\n", columns=CSV_COLUMNS),
     "dataset 'myqa': the source has no rows"),
    ("data-not-utf8", source_file("myqa.csv", LATIN1_CSV, columns=CSV_COLUMNS),
     "myqa.csv: it is not UTF-8 text ("),
    ("data-answers-not-lists",
     source_file("myqa.jsonl", b'{"question": "Where was Ito born?", "answers": {"city": "Lyon"}, "subject": "Ito", '
                 b'"relation": "born"}\n' * 3 + b'{"question": "Where was Lu born?", "answers": ["Rome"], "subject": "Lu", '
                 b'"relation": "born"}\n'),
     "dataset 'myqa': 3 of 4 rows are invalid ({'answers not a list or a string': 3}), more than split.max_drop_fraction"),
    ("data-duplicate-ids", source_file("myqa.csv", b"k,q,a,s,r\n1,Q1?,Lyon,Ito,born\n1,Q2?,Rome,Lu,born\n",
                                       columns=dict(CSV_COLUMNS, id="k")),
     "dataset 'myqa': 1 duplicate ids in column 'k', e.g. ['1']; map datasets.myqa.columns.id to a unique column"),
    ("data-unknown-file-type", source_file("myqa.xlsx", b"PK", columns=CSV_COLUMNS),
     "datasets.myqa.source: cannot tell the kind of file myqa.xlsx from its name; factft reads csv, tsv"),
    ("config-file-of-unknown-kind",
     config_with(add_dataset(source={"path": "myqa.txt"}, popularity={"scorer": "column", "column": "v"})),
     "datasets.myqa.source: cannot tell the kind of file myqa.txt from its name"),
    ("config-reader-of-a-hub-dataset",
     config_with(add_dataset(source={"hf": "org/myqa", "reader": "csv"},
                             popularity={"scorer": "column", "column": "v"})),
     "datasets.myqa.source.reader: reads a path's or a url's file; remove it"),
    ("data-non-numeric-popularity", scored(["many"] * 10 + [3.0, 4.0]),
     "10 of 12 rows are invalid ({'popularity missing or not a number': 10}), more than split.max_drop_fraction 0.1"),
    ("data-negative-popularity", scored([-1.0] * 12, max_drop_fraction=1.0),
     "all 12 rows are invalid ({'negative popularity (a count or rate, >= 0: not its logarithm)': 12}), "
     "nothing is left"),
    ("data-truncated-parquet", corrupt_table, "cannot read table elsewhere/facts.parquet: "),
    # environment
    ("env-qlora-without-bitsandbytes", without_module("bitsandbytes", finetuned(method="qlora")),
     "finetune.method qlora needs bitsandbytes (4-bit NF4 base): pip install 'factft[qlora]'"),
    ("env-adamw8bit-without-bitsandbytes",
     without_module("bitsandbytes", finetuned(method="full", optimizer="adamw8bit")),
     "finetune.optimizer adamw8bit needs bitsandbytes (8-bit moments): pip install 'factft[qlora]' (envs/torch.yaml "
     "has it), or use adamw"),
    ("env-model-folder-without-weights", model_folder("config.json", "tokenizer.json"),
     "model 'tiny': no safetensors weights in "),
    ("env-model-folder-with-only-pickled-weights", model_folder("config.json", "pytorch_model.bin"),
     "only *.safetensors or a GGUF file are loaded, since pickled .bin weights can run code"),
    ("env-adapter-with-only-pickled-weights", adapter_with_only_pickled_weights,
     "has no adapter_model.safetensors (found ['adapter_config.json', 'adapter_model.bin']); only safetensors"),
    ("env-model-not-downloaded", finetuned(model="resources/models/llama"),
     "model 'tiny': folder resources/models/llama does not exist; run `snakemake download_models` where there is "
     "internet, or set models.tiny.source.path"),
    ("env-hub-unreachable-for-a-dataset", hub_dataset_offline,
     "dataset 'myqa': cannot reach the Hugging Face hub ("),
    ("env-hub-unreachable-for-a-model", hub_model_offline,
     "model 'llama': cannot reach the hub for factft-test/not-cached (LocalEntryNotFoundError); run "
     "`snakemake download_models` where there is internet"),
    ("env-a-file-where-a-folder-is-expected", write_where_a_folder_is_a_file,
     "cannot write results/popqa/facts.parquet: results/popqa is a file where a folder is expected; move or delete"),
    ("env-adapter-path-is-a-file", finetuned("results/tiny/synth/top/seed0/metrics.tsv"),
     "cannot write results/tiny/synth/top/seed0/metrics.tsv: it already exists as a file, where a folder is expected"),
    ("env-existing-adapter", finetuned(str(RUN / "adapter")),
     f"cannot write {RUN / 'adapter'}: it already exists as a folder that is not empty; delete it to make it again"),
]  # fmt: skip


@pytest.mark.parametrize(("action", "message"), [pytest.param(a, m, id=i) for i, a, m in CATALOGUE])
def test_bad_input_stops_with_a_clear_message_and_changes_no_result(tree, action, message):
    before = file_hashes(tree.root)
    with pytest.raises((FactftError, WorkflowError)) as caught:
        action(tree)
    text = str(caught.value)
    for part in (message,) if isinstance(message, str) else message:
        assert part in text
    if isinstance(caught.value, FactftError):
        assert "\n" not in text and "Traceback" not in text
    after = file_hashes(tree.root)
    assert {k: after.get(k) for k in before} == before, "an existing file changed or vanished"
    new = [k for k in after if k not in before and k.startswith(("results", "resources/models", "resources/datasets"))]
    assert new == [], f"a failed step left output behind: {new}"


def test_the_catalogue_covers_config_data_and_environment_with_unique_names():
    names = [name for name, _, _ in CATALOGUE]
    assert len(names) == len(set(names)) >= 20
    kinds = {name.split("-")[0] for name in names}
    assert {"config", "data", "env"} <= kinds
    assert all(message for _, _, message in CATALOGUE)


def test_a_good_source_file_passes_through_the_same_path(tree):
    """The actions fail because of their bad input, not because the path they take is broken."""
    source_file("myqa.csv", GOOD_CSV, columns=CSV_COLUMNS)(tree)
    assert read_table("resources/datasets/myqa/raw.parquet")["answers"].map(list).tolist() == [["Lyon"], ["Rome"]]
    config_with(lambda c: None)(tree)
    split_with(make_facts, test_fraction=0.34)(tree)


def test_a_number_as_the_answer_is_kept_as_text_not_dropped(tree):
    """A csv cell is the text it holds: "007" is no 7, a subject "1984" no 1984.0."""
    rows = b"q,a,s,r\nWhen was Ito born?,1990,Ito,born\nWho is Bond?,007,1984,agent\nHow much?,2.50,Lu,price\n"
    source_file("years.csv", rows, columns=CSV_COLUMNS)(tree)
    raw = read_table("resources/datasets/myqa/raw.parquet")
    assert raw["answers"].map(list).tolist() == [["1990"], ["007"], ["2.50"]]
    assert raw["subject"].tolist() == ["Ito", "1984", "Lu"]
    # Integers that pandas wrote as floats (an integer column with a missing cell) are integers again.
    years = [1990 + i for i in range(9)] + [None]
    people = [f"p{i}" for i in range(10)]
    written = pd.DataFrame({"q": [f"When was {p} born?" for p in people], "a": years, "s": people, "r": ["born"] * 10})
    written = written.to_csv(index=False)
    assert written.splitlines()[1] == "When was p0 born?,1990.0,p0,born"
    source_file("years.csv", written.encode(), columns=CSV_COLUMNS)(tree)
    answers = read_table("resources/datasets/myqa/raw.parquet")["answers"].map(list).tolist()
    assert answers == [[str(year)] for year in years[:9]]

