"""The config is checked before any job runs: schema errors name the key, defaults fill in."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config, validate

from factft.config import (
    SCHEMA,
    apply_command_line,
    check_config,
    check_numbers,
    command_line_config,
    evaluate_job_settings,
    finetune_job_settings,
    finetune_settings,
    missing_local_paths,
    prepare_config,
    prompt_settings,
    runs_on,
    sort_settings,
)
from factft.errors import FactftError

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


def validated(config):
    config = copy.deepcopy(config)
    check_numbers(config)
    validate(config, str(SCHEMA))
    check_config(config)
    return config


def schema_error(config):
    with pytest.raises(Exception) as caught:
        validate(config, str(SCHEMA))
    return str(caught.value)


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    validated(load(name))


def test_defaults_fill_in_what_the_config_leaves_out():
    config = validated({"datasets": load("demo.yaml")["datasets"], "models": load("demo.yaml")["models"]})
    assert config["split"]["fraction"] == 0.5
    assert config["split"]["stratify"] == "relation"
    assert config["finetune"]["lora"]["r"] == 16
    assert config["prompt"]["template"] == "Q: {question} A:"
    assert config["evaluate"]["percentiles"][-1] == 100
    assert config["models"]["tiny"]["source"]["pretrain"]["layers"] == 2


def test_unknown_top_level_key_is_rejected_by_name():
    config = load("config.yaml")
    config["seedz"] = [1]
    assert "seedz" in schema_error(config)


@pytest.mark.parametrize("block", ["datasets", "models"])
def test_a_config_without_datasets_or_models_names_the_missing_block(block):
    config = load("demo.yaml")
    del config[block]
    assert f"'{block}' is a required property" in schema_error(config)


def test_unknown_nested_key_is_rejected_by_name():
    config = load("config.yaml")
    config["split"]["fractoin"] = 0.5
    assert "fractoin" in schema_error(config)


def test_wrong_type_names_the_key():
    config = load("config.yaml")
    config["finetune"]["epochs"] = "three"
    message = schema_error(config)
    assert "epochs" in message and "'three'" in message


@pytest.mark.parametrize(
    ("written", "spelling", "value"),
    [("1e-4", "1.0e-4", 1e-4), ("3E-5", "3.0e-5", 3e-5), ("2.5e0", "2.5e+0", 2.5), ("1.0e4", "10000", 10000)],
)
def test_a_number_yaml_reads_as_text_is_named_with_the_spelling_it_reads_as_a_number(written, spelling, value):
    # PyYAML follows YAML 1.1: a float needs a dot and a signed exponent, so 1e-4 is a string.
    text = (ROOT / "config" / "config.yaml").read_text().replace("learning_rate: 1.0e-4", f"learning_rate: {written}")
    config = yaml.safe_load(text)
    with pytest.raises(FactftError) as caught:
        check_numbers(config)
    assert str(caught.value) == f"finetune.learning_rate: '{written}' is text to YAML, not a number; write {spelling}"
    fixed = validated(yaml.safe_load(text.replace(f"learning_rate: {written}", f"learning_rate: {spelling}")))
    assert fixed["finetune"]["learning_rate"] == value


def test_a_model_override_written_as_text_is_named_where_it_was_set():
    config = validated(load("config.yaml"))
    config["models"]["llama2-7b"]["finetune"] = yaml.safe_load("learning_rate: 3e-5")
    expected = r"^models\.llama2-7b\.finetune\.learning_rate: '3e-5' is text to YAML.*3\.0e-5$"
    with pytest.raises(FactftError, match=expected):
        finetune_settings(config, "llama2-7b")


def test_a_whole_number_written_with_a_decimal_point_is_named_where_the_key_takes_whole_ones():
    # JSON Schema's integer takes 16.0, which the finetune would fail on after loading its model.
    config = load("config.yaml")
    config["finetune"]["batch_size"] = 16.0
    with pytest.raises(FactftError, match=r"^finetune\.batch_size: 16\.0 is a decimal number .*; write 16$"):
        check_numbers(config)
    config = validated(load("config.yaml"))
    config["models"]["llama2-7b"]["finetune"] = {"lora": {"r": 8.0}, "learning_rate": 1.0}  # a rate may be 1.0
    with pytest.raises(FactftError, match=r"^models\.llama2-7b\.finetune\.lora\.r: 8\.0 is a decimal number"):
        finetune_settings(config, "llama2-7b")


def test_text_that_looks_like_a_number_is_left_alone_where_the_schema_wants_text():
    config = load("config.yaml")
    config["models"]["llama2-7b"]["source"]["revision"] = "8e12345"  # a commit, not 8 x 10^12345
    check_numbers(config)
    validated(config)


# At 1 FT-Top, FT-Bottom and FT-Random would each be the whole pool.
def test_contact_must_fit_an_http_header():
    config = load("config.yaml")
    config["contact"] = "ada@example.org (https://example.org/lab)"
    validated(config)
    for bad in ("ada@example.org\n", "Łukasz <l@example.pl>"):
        config["contact"] = bad
        assert "schema['properties']['contact']" in schema_error(config)


@pytest.mark.parametrize("fraction", [0, -0.1, 1, 1.5])
def test_fraction_outside_zero_one_is_rejected(fraction):
    config = load("config.yaml")
    config["split"]["fraction"] = fraction
    message = schema_error(config)
    assert "schema['properties']['split']['properties']['fraction']" in message


def test_unknown_scorer_is_rejected_with_the_known_ones():
    config = load("config.yaml")
    config["datasets"]["popqa"]["popularity"]["scorer"] = "fame"
    message = schema_error(config)
    assert "'fame'" in message and "pageviews" in message and "popularity" in message


@pytest.mark.parametrize("key", ["source", "popularity"])
def test_dataset_without_source_or_popularity_is_rejected(key):
    config = load("config.yaml")
    del config["datasets"]["popqa"][key]
    message = schema_error(config)
    assert f"'{key}' is a required property" in message and "popqa" in message


def test_source_with_two_kinds_is_rejected():
    config = load("config.yaml")
    config["datasets"]["popqa"]["source"]["path"] = "popqa.csv"
    assert "popqa" in schema_error(config)


@pytest.mark.parametrize("name", ["pop/qa", "..", "../etc", "pop qa", ".hidden"])
def test_unsafe_dataset_names_are_rejected(name):
    config = load("config.yaml")
    config["datasets"][name] = config["datasets"].pop("popqa")
    message = schema_error(config)
    assert repr(name) in message or name in message


@pytest.mark.parametrize("name", ["llama/2", "..", "a..b/c"])
def test_unsafe_model_names_are_rejected(name):
    config = load("config.yaml")
    config["models"][name] = config["models"].pop("mistral-7b")
    assert name in schema_error(config)


def test_column_scorer_without_column_names_the_key():
    config = load("config.yaml")
    del config["datasets"]["popqa"]["popularity"]["column"]
    with pytest.raises(FactftError, match=r"datasets\.popqa\.popularity\.column: required by scorer 'column'"):
        validated(config)


def test_model_confidence_scorer_needs_a_configured_model():
    config = load("config.yaml")
    config["datasets"]["mmlu"]["popularity"]["model"] = "gpt-9"
    with pytest.raises(FactftError, match=r"datasets\.mmlu\.popularity\.model: 'gpt-9' is not a configured model"):
        validated(config)


def test_a_models_datasets_list_limits_the_grid_and_names_only_datasets_it_can_read():
    config = load("config.yaml")
    config["models"]["mistral-7b"]["datasets"] = ["popqa"]
    config = validated(config)
    assert [d for d in config["datasets"] if runs_on(config, "mistral-7b", d)] == ["popqa"]
    assert all(runs_on(config, "llama2-7b", d) for d in config["datasets"])  # no list: every dataset
    config["models"]["mistral-7b"]["datasets"] = ["popqa", "trivia"]
    with pytest.raises(FactftError, match=r"models\.mistral-7b\.datasets: 'trivia' is not a configured dataset"):
        validated(config)
    demo = load("demo.yaml")
    demo["datasets"]["other"] = copy.deepcopy(demo["datasets"]["synth"])
    demo["models"]["tiny"]["datasets"] = ["synth", "other"]
    with pytest.raises(FactftError, match=r"models\.tiny\.datasets: 'other' is not the world the model is pretrained on"):
        validated(demo)


def test_pretraining_count_needs_a_synthetic_world():
    config = load("config.yaml")
    config["datasets"]["popqa"]["popularity"] = {"scorer": "pretraining_count"}
    with pytest.raises(FactftError, match="pretraining_count needs a synthetic source"):
        validated(config)


def test_pretraining_on_a_dataset_that_is_not_a_world_is_rejected():
    config = load("demo.yaml")
    config["models"]["tiny"]["source"]["pretrain"]["dataset"] = "nowhere"
    with pytest.raises(FactftError, match=r"models\.tiny\.source\.pretrain\.dataset: 'nowhere'"):
        validated(config)


def test_per_model_finetune_overrides_merge_and_are_checked():
    config = load("config.yaml")
    config["models"]["llama2-7b"]["finetune"] = {"method": "qlora", "lora": {"r": 64}}
    config = validated(config)
    merged = finetune_settings(config, "llama2-7b")
    assert merged["method"] == "qlora" and merged["lora"]["r"] == 64
    assert merged["lora"]["alpha"] == 32  # kept from the top-level block
    assert finetune_settings(config, "mistral-7b")["method"] == "lora"
    config["models"]["llama2-7b"]["finetune"] = {"method": "dora"}
    with pytest.raises(FactftError, match=r"models\.llama2-7b\.finetune\.method"):
        finetune_settings(config, "llama2-7b")


def test_a_local_model_folder_that_cannot_be_loaded_stops_the_workflow_at_start(tmp_path):
    """Before any data job runs: not when its first model job fails (on a GPU node, retried)."""
    config = load("demo.yaml")
    config["models"]["mine"] = {"source": {"path": str(tmp_path)}}
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FactftError, match=rf"model 'mine': no safetensors weights in {tmp_path} .*pytorch_model.bin"):
        prepare_config(copy.deepcopy(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FactftError, match=rf"model 'mine': no tokenizer files in {tmp_path}"):
        prepare_config(copy.deepcopy(config))
    (tmp_path / "tokenizer.json").write_text("{}")
    prepare_config(copy.deepcopy(config))
    config["models"]["mine"]["chat"] = True
    with pytest.raises(FactftError, match=r"models.mine.chat is on, but .* holds no chat template"):
        prepare_config(copy.deepcopy(config))
    # A gguf_file that is not there is warned about (missing_local_paths), as a missing folder is.
    config["models"]["mine"] = {"source": {"path": str(tmp_path), "gguf_file": "m.gguf"}}
    prepare_config(copy.deepcopy(config))
    assert missing_local_paths(config) == [f"models.mine.source.gguf_file: no file m.gguf in {tmp_path}"]


def test_overrides_of_a_model_and_a_dataset_it_never_runs_on_do_not_clash():
    """The demo's tiny model reads only its own world: a hub dataset's override is not its."""
    config = load("demo.yaml")
    config["datasets"]["popqa"] = dict(load("config.yaml")["datasets"]["popqa"], finetune={"max_length": 64})
    config["models"]["tiny"]["finetune"] = {"max_length": 32}
    config = validated(config)
    assert finetune_settings(config, "tiny", "synth")["max_length"] == 32


def test_per_dataset_finetune_overrides_merge_and_a_clash_with_a_models_is_named():
    config = load("config.yaml")
    config["datasets"]["entityquestions"]["finetune"] = {"epochs": 1, "lora": {"r": 8}}
    config["models"]["llama2-7b"]["finetune"] = {"lora": {"alpha": 64}}
    config = validated(config)
    merged = finetune_settings(config, "llama2-7b", "entityquestions")
    assert (merged["epochs"], merged["lora"]["r"], merged["lora"]["alpha"]) == (1, 8, 64)
    assert finetune_settings(config, "llama2-7b", "popqa")["epochs"] == 3  # other datasets keep the block's
    assert finetune_settings(config, "mistral-7b", "entityquestions")["lora"]["alpha"] == 32
    config["models"]["llama2-7b"]["finetune"]["lora"]["r"] = 8  # the same value in both: no clash
    assert finetune_settings(config, "llama2-7b", "entityquestions")["lora"]["r"] == 8
    config["models"]["llama2-7b"]["finetune"]["lora"]["r"] = 4
    with pytest.raises(FactftError, match=r"finetune\.lora\.r: set differently in models\.llama2-7b\.finetune and "
                       r"datasets\.entityquestions\.finetune"):
        check_config(config)
    config["models"]["llama2-7b"]["finetune"] = {}
    config["datasets"]["entityquestions"]["finetune"] = {"epochs": 0}
    with pytest.raises(FactftError, match=r"^datasets\.entityquestions\.finetune\.epochs: 0 is less"):
        check_config(config)
    config["datasets"]["entityquestions"]["finetune"] = {"epoch": 1}
    with pytest.raises(FactftError, match=r"^datasets\.entityquestions\.finetune: .*'epoch' was unexpected"):
        check_config(config)


def test_a_job_gets_its_own_datasets_settings_its_seed_and_nothing_that_should_not_rerun_it():
    config = validated(load("config.yaml"))
    popqa = finetune_job_settings(config, "llama2-7b", "popqa", "2")
    mmlu = finetune_job_settings(config, "llama2-7b", "mmlu", 0)
    assert (popqa["max_length"], mmlu["max_length"]) == (128, 512)  # MMLU's own, room for its options
    assert (popqa["seed"], mmlu["seed"]) == (2, 0)
    # How often progress is saved decides nothing; a setting added later shows only when it
    # changes what runs.
    assert not {"checkpoint_every", "gradient_checkpointing", "compile", "optimizer", "max_grad_norm"} & set(popqa)
    config["finetune"].update(compile=True, optimizer="adamw8bit", max_grad_norm=1.0)
    changed = finetune_job_settings(config, "llama2-7b", "popqa", 0)
    assert (changed["compile"], changed["optimizer"], changed["max_grad_norm"]) == (True, "adamw8bit", 1.0)
    mc, open_qa = evaluate_job_settings(config, "mmlu"), evaluate_job_settings(config, "popqa")
    assert mc["format"] == "multiple_choice" and mc["choice_score"] == config["evaluate"]["choice_score"]
    assert open_qa["format"] == "open" and "choice_score" not in open_qa
    assert open_qa["max_new_tokens"] == config["evaluate"]["max_new_tokens"]
    assert not {"fewshot", "attention_questions"} & (mc.keys() | open_qa.keys())  # other rules' settings
    # How an evaluation runs (not its params, so no rerun), and the metrics rule's percentiles.
    assert not {"batch_size", "static_cache", "percentiles"} & (mc.keys() | open_qa.keys())


def test_a_datasets_prompt_overrides_the_top_level_one_key_by_key_and_fits_its_format():
    config = validated(load("config.yaml"))
    assert prompt_settings(config, "mmlu") == {"answer": " {letter}", "template": "{question}\n{choices}\nAnswer:"}
    assert prompt_settings(config, "popqa") == config["prompt"]
    config["datasets"]["mmlu"]["prompt"] = {"answer": " {answer}"}  # the options shown, each scored by its text
    assert prompt_settings(config, "mmlu") == {"answer": " {answer}", "template": "Q: {question} A:"}
    config["datasets"]["mmlu"]["prompt"] = {"answer": " {letter}"}
    with pytest.raises(FactftError, match=r"^datasets\.mmlu\.prompt\.answer: \{letter\} names an option, but "
                       r"prompt\.template does not show the options of dataset 'mmlu'; add \{choices\}"):
        check_config(config)
    config["datasets"]["mmlu"]["prompt"] = {}
    config["prompt"]["template"] = "{question}\n{choices}\nAnswer:"
    with pytest.raises(FactftError, match=r"^prompt\.template: \{choices\} is for multiple-choice datasets and "
                       r"'popqa' is open QA"):
        check_config(config)
    config["prompt"]["template"] = "Q: {question} A:"
    config["datasets"]["popqa"]["prompt"] = {"answer": " {letter}"}
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.prompt\.answer: \{letter\} is for multiple-choice"):
        check_config(config)
    config["datasets"]["popqa"]["prompt"] = {"answer": " {answer} ({letter})"}
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.prompt\.answer: \{letter\}"):
        check_config(config)
    config["datasets"]["popqa"]["prompt"] = {"answer": "none"}
    assert "does not match" in schema_error(config)
    config["datasets"]["popqa"]["prompt"] = {}
    config["datasets"]["mmlu"]["prompt"] = {"template": "{question}\n{choice}\nAnswer:", "answer": " {answer}"}
    with pytest.raises(FactftError, match=r"^datasets\.mmlu\.prompt\.template: \{choice\} is not a field of a "
                       r"prompt template; its fields are \{choices\}, \{question\}"):
        check_config(config)
    config["datasets"]["mmlu"]["prompt"] = {"template": "{question} {letter}?", "answer": " {answer}"}
    with pytest.raises(FactftError, match=r"prompt\.template: \{letter\} is not a field"):
        check_config(config)
    config["datasets"]["mmlu"]["prompt"] = {"template": "{question} {not a field} {}", "answer": " {answer}"}
    check_config(config)  # braces around no single word stay literal
    config["datasets"]["mmlu"]["prompt"] = {}
    config["prompt"] = {"template": "Q: {question} A: ", "answer": "{answer}"}
    with pytest.raises(FactftError, match=r"^prompt\.template ends in whitespace \('Q: \{question\} A: '\); put the "
                       r"space at the start of prompt\.answer instead \(e\.g\. ' \{answer\}'\)"):
        check_config(config)
    config["prompt"] = {"template": "Question: {question}\nAnswer:\n", "answer": "{answer}"}
    check_config(config)  # a line break ends a prompt well: nothing joins it to the next word


def test_a_kept_or_scored_column_named_like_a_facts_column_is_named_before_any_job():
    config = load("config.yaml")
    config["datasets"]["popqa"]["popularity"] = {"scorer": "pageviews", "title_column": "subject"}
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.popularity\.title_column: source column 'subject' "
                       r"has the name of a facts column"):
        validated(config)
    config["datasets"]["popqa"]["popularity"] = {"scorer": "column", "column": "popularity"}  # the one scored
    validated(config)
    config["datasets"]["popqa"]["popularity"] = {"scorer": "column", "column": "s_pop"}
    config["datasets"]["popqa"]["keep_columns"] = ["s_pop", "subject"]
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.keep_columns: source column 'subject'"):
        validated(config)
    config["datasets"]["popqa"]["keep_columns"] = ["split"]  # a column `split` writes
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.keep_columns: source column 'split'"):
        validated(config)


def test_a_popularity_key_the_scorer_does_not_read_or_a_column_kept_twice_is_named():
    config = load("config.yaml")
    config["datasets"]["entityquestions"]["popularity"]["column"] = "s_wiki_title"  # meant as title_column
    with pytest.raises(FactftError, match=r"^datasets\.entityquestions\.popularity\.column: scorer 'pageviews' "
                       r"does not read it \(it reads: project, start, end, title_column, follow_redirects\)"):
        validated(config)
    config = load("config.yaml")
    config["datasets"]["popqa"]["popularity"]["model"] = "llama2-7b"
    with pytest.raises(FactftError, match=r"^datasets\.popqa\.popularity\.model: scorer 'column' does not read"):
        validated(config)
    config = load("config.yaml")
    config["datasets"]["popqa"]["keep_columns"] = ["s_pop", "s_pop"]
    assert "has non-unique elements" in schema_error(config)


def test_settings_are_sorted_and_the_users_named_maps_keep_their_order():
    config = validated(load("config.yaml"))
    config["models"] = {"mistral-7b": config["models"]["mistral-7b"], "llama2-7b": config["models"]["llama2-7b"]}
    sort_settings(config)
    assert list(config["finetune"]) == sorted(config["finetune"]) and list(config["finetune"]["lora"]) == sorted(
        config["finetune"]["lora"]
    )
    assert list(config["models"]) == ["mistral-7b", "llama2-7b"]  # figures and tables follow the config
    assert list(config["datasets"]) == ["popqa", "entityquestions", "mmlu"]
    assert list(config["datasets"]["popqa"]) == sorted(config["datasets"]["popqa"])
    assert list(config["simulation"]["sweeps"]) == ["zipf", "pretrain_steps", "qa_similarity", "finetune_steps"]
    assert config["finetune"]["lora"]["target_modules"] == ["q_proj", "v_proj"]  # lists keep their order
    assert config["evaluate"]["percentiles"] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path):
    config = load("demo.yaml")
    config["split"]["fraction"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "--directory", str(tmp_path),
         "-s", str(ROOT / "Snakefile")],
        capture_output=True, text=True,
    )
    assert run.returncode != 0
    assert "fraction" in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()


def plan_paper_grid_with(folder, *config_args):
    """`snakemake all -n` in `folder` with config.yaml and `--config config_args`."""
    (folder / "config").symlink_to(ROOT / "config")  # the default config's path is read in --directory
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "all", "-n", "--directory", str(folder), "-s", str(ROOT / "Snakefile"),
         "--config", *config_args],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip


def test_config_on_the_command_line_overrides_keys_of_the_paper_grid(tmp_path):
    run = plan_paper_grid_with(tmp_path, "subsets=[top]", "seeds=[0, 2]", "split={pool_size: 2000}")
    assert run.returncode == 0, run.stderr[-2000:]
    # 3 datasets x 2 models x FT-Top alone x seeds 0 and 2: config.yaml's grid, three keys changed.
    assert re.search(r"^finetune\s+12$", run.stdout, re.MULTILINE), run.stdout[-3000:]


def test_a_model_limited_to_some_datasets_runs_on_those_alone(tmp_path):
    run = plan_paper_grid_with(tmp_path, "models={mistral-7b: {datasets: [popqa]}}")
    assert run.returncode == 0, run.stderr[-2000:]
    # llama2-7b on 3 datasets, mistral-7b on PopQA alone: 4 pairs x 4 subsets x 3 seeds.
    assert re.search(r"^finetune\s+48$", run.stdout, re.MULTILINE), run.stdout[-3000:]
    explicit = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/mistral-7b/mmlu/base/metrics.tsv", "-n", "--directory",
         str(tmp_path), "-s", str(ROOT / "Snakefile"), "--config", "models={mistral-7b: {datasets: [popqa]}}"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    assert explicit.returncode != 0
    assert "model 'mistral-7b' runs on the datasets models.mistral-7b.datasets lists (popqa), not on 'mmlu'" in (
        explicit.stderr + explicit.stdout
    )
    # Nor is MMLU ranked by its confidence (a GPU job) for runs it does not make.
    ranking = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/mmlu/by-mistral-7b/splits/top.parquet", "-n", "--directory",
         str(tmp_path), "-s", str(ROOT / "Snakefile"), "--config", "models={mistral-7b: {datasets: [popqa]}}"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    assert ranking.returncode != 0 and "No rule to produce results/mmlu/by-mistral-7b" in ranking.stderr + ranking.stdout


def test_command_line_lists_and_maps_are_read_as_the_config_file_reads_them():
    config = load("config.yaml")
    # What Snakemake passes on: each argument as typed, its value after the first "=".
    typed = command_line_config(["seeds=[0, 2]", "split={pool_size: 2000, test_size: null}", "contact=a=b", "x=[0"])
    assert typed == [{"seeds": [0, 2]}, {"split": {"pool_size": 2000, "test_size": None}}]
    for given in typed:
        update_config(config, given)
    config = validated(config)
    assert config["seeds"] == [0, 2]
    # A map merges into the key's map, as Snakemake's own --config does.
    assert config["split"] == {**load("config.yaml")["split"], "pool_size": 2000, "test_size": None}


def test_a_command_line_source_or_scorer_replaces_the_config_files_block():
    config = load("config.yaml")
    apply_command_line(config, [
        "datasets={popqa: {popularity: {scorer: pageviews, title_column: s_wiki_title}}, "
        "entityquestions: {source: {hf: me/eq, split: test}, popularity: {end: '20231130'}}}",
        "models={llama2-7b: {source: {pretrain: {dataset: world}}}}",
    ])  # fmt: skip
    datasets, paper = config["datasets"], load("config.yaml")["datasets"]
    # Merged, the old choice's keys would stay: column beside title_column, url beside hf.
    assert datasets["popqa"]["popularity"] == {"scorer": "pageviews", "title_column": "s_wiki_title"}
    assert datasets["entityquestions"]["source"] == {"hf": "me/eq", "split": "test"}
    assert config["models"]["llama2-7b"]["source"] == {"pretrain": {"dataset": "world"}}
    # A popularity block without a scorer tunes the file's scorer; the rest of a dataset merges.
    assert datasets["entityquestions"]["popularity"] == {**paper["entityquestions"]["popularity"], "end": "20231130"}
    assert datasets["popqa"]["columns"] == paper["popqa"]["columns"]


def test_a_command_line_key_given_twice_merges_twice_in_order():
    config = load("config.yaml")
    apply_command_line(config, [
        "datasets={popqa: {popularity: {scorer: pageviews, title_column: s_wiki_title}}}",
        "datasets={popqa: {popularity: {start: '20220101'}}, mmlu: {finetune: {max_length: 256}}}",
        "split={pool_size: 2000}", "split={test_size: 100}",
    ])  # fmt: skip
    popqa = config["datasets"]["popqa"]["popularity"]
    assert popqa == {"scorer": "pageviews", "title_column": "s_wiki_title", "start": "20220101"}
    assert config["datasets"]["mmlu"]["finetune"]["max_length"] == 256
    assert (config["split"]["pool_size"], config["split"]["test_size"]) == (2000, 100)  # numbers, both


def test_a_malformed_command_line_list_is_named_by_the_schema(tmp_path):
    run = plan_paper_grid_with(tmp_path, "seeds=[0, 1")
    assert run.returncode != 0
    assert "'[0, 1' is not of type 'array'" in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()


def test_a_misspelt_key_is_one_line_naming_it_not_the_schema_and_config(tmp_path):
    run = plan_paper_grid_with(tmp_path, "split={fractoin: 0.5}")
    assert run.returncode != 0
    output = run.stderr + run.stdout
    assert "config: split: Additional properties are not allowed ('fractoin' was unexpected)" in output
    # Snakemake's own message printed the whole schema and config after it: 1,500 lines.
    assert len(output.splitlines()) < 10, output[:3000]


def test_a_command_line_number_yaml_reads_as_text_is_named_before_any_job(tmp_path):
    run = plan_paper_grid_with(tmp_path, "split={pool_size: 2e3}")
    assert run.returncode != 0
    assert "config: split.pool_size: '2e3' is text to YAML, not a number; write 2000" in run.stderr + run.stdout
    assert not (tmp_path / "results").exists()


def test_a_model_pretrained_here_is_paired_only_with_its_own_world(tmp_path):
    """The demo's tiny model knows only its world's words (any other is <unk> to its tokenizer):
    `all` pairs it with no other dataset, and asking for such a run says why."""
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    rows = ["q,a,s,r,v", "Where was Ito born?,Lyon,Ito,born,3", "Where was Lu born?,Rome,Lu,born,5"]
    (tmp_path / "myqa.csv").write_text("\n".join(rows) + "\n")
    config["datasets"]["myqa"] = {
        "source": {"path": "myqa.csv"},
        "columns": {"question": "q", "answers": "a", "subject": "s", "relation": "r"},
        "keep_columns": ["v"],
        "popularity": {"scorer": "column", "column": "v"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def plan(target):
        return subprocess.run(
            [sys.executable, "-m", "snakemake", target, "-n", "-d", str(tmp_path), "-s", str(ROOT / "Snakefile"),
             "--configfile", str(tmp_path / "config.yaml")],
            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
        )  # fmt: skip

    grid = plan("all")
    assert grid.returncode == 0, grid.stderr[-3000:]
    assert "dataset 'myqa': no model runs on it" in grid.stderr + grid.stdout
    assert re.search(r"^finetune\s+\d+$", grid.stdout, re.MULTILINE) and "dataset=myqa" not in grid.stdout
    run = plan("results/tiny/myqa/top/seed0/metrics.tsv")
    assert run.returncode != 0
    assert "model 'tiny' is pretrained on dataset 'synth''s world and knows no other words" in run.stderr + run.stdout


def test_every_missing_local_source_is_named_by_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "qa.csv").write_text("q\n")
    config = {"datasets": {"qa": {"source": {"path": "qa.csv"}}}, "models": {"m": {"source": {"path": "model"}}}}
    assert missing_local_paths(config) == []
    config["models"]["m"]["source"]["gguf_file"] = "m.gguf"
    assert missing_local_paths(config) == ["models.m.source.gguf_file: no file m.gguf in model"]
    config["datasets"]["qa"]["source"]["path"] = "gone.csv"
    config["models"]["n"] = {"source": {"path": "gone", "gguf_file": "n.gguf"}}
    assert missing_local_paths(config) == [
        f"datasets.qa.source.path: no file gone.csv (in {tmp_path})",
        "models.m.source.gguf_file: no file m.gguf in model",
        f"models.n.source.path: no folder gone (in {tmp_path})",
    ]
