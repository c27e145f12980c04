"""bench/grid_hours.py: the paper grid's GPU hours from a config and a speed table."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_grid_hours", ROOT / "bench" / "grid_hours.py")
grid_hours = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(grid_hours)


def speed_table(path: Path, device: str = "cuda", **rates) -> Path:
    """A table shaped like bench/speed.py's, with the given rates."""
    rows = [
        ("finetune", "lora-qv", "baseline", rates.get("baseline_tps", 8_000.0), None, 60.0, 2000, 3600),
        ("finetune", "lora-qv", "factft", rates.get("factft_tps", 20_000.0), None, 40.0, 2000, 2100),
        ("finetune", "qlora-all", "factft-packed-gc", 6_000.0, None, rates.get("qlora_gb", 11.5), 2000, 2000),
        ("evaluate", "lora-qv adapter", "baseline", None, 60.0, 20.0, None, None),
        # In rounds (the "factft" rows), factft.generate's default off a GPU; one round, on a GPU.
        ("evaluate", "lora-qv adapter", "factft", None, 350.0, 30.0, None, None),
        ("evaluate", "lora-qv adapter", "factft-one-round", None, rates.get("factft_qps", 600.0), 30.0, None, None),
        ("evaluate", "lora-qv adapter, answers end", "baseline", None, 100.0, 20.0, None, None),
        ("evaluate", "lora-qv adapter, answers end", "factft", None, 1_200.0, 30.0, None, None),
        ("evaluate", "lora-qv adapter, answers end", "factft-one-round", None, 1_500.0, 30.0, None, None),
        ("evaluate", "multiple choice, 4", "factft", None, 9_999.0, 30.0, 1000, 400),  # not open QA's rate
    ]
    if "load_s" in rates:
        rows.append(("load", "model", "factft", None, None, 14.0, None, None))
    if "packed_tps" in rates:
        rows.append(("finetune", "lora-qv", "factft-packed", rates["packed_tps"], None, 38.0, 2000, 2000))
    if "compiled_tps" in rates:
        rows.append(("finetune", "lora-qv", "factft-compiled", rates["compiled_tps"], None, 40.0, 2000, 2100))
    if "graphs_tps" in rates:
        rows.append(("finetune", "lora-qv", "factft-graphs", rates["graphs_tps"], None, 40.0, 2000, 2200))
    columns = ["stage", "variant", "path", "tokens_per_s", "questions_per_s", "peak_gb", "real_tokens", "computed_tokens"]
    table = pd.DataFrame(rows, columns=columns)
    table["compile_s"] = (table["path"] == "factft-compiled") * 90.0
    table["batch_size"] = rates.get("batch_size", 16)  # config.yaml's
    table["seconds"] = (table["stage"] == "load") * rates.get("load_s", 0.0)
    table["note"] = (table["stage"] == "load").map({True: "13.48 GB of safetensors on ext4", False: None})
    table.insert(0, "device_name", "NVIDIA H200" if device == "cuda" else "CPU")
    table.insert(0, "device", device)
    table.insert(0, "date", "2026-11-29")
    out = path / "speed.tsv"
    table.to_csv(out, sep="\t", index=False)
    return out


def small_config(path: Path, **finetune) -> Path:
    """config/config.yaml cut to PopQA, one model, FT-Top and FT-Whole, one seed; padded
    batches (the `factft` rows) unless `packing` is given."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["datasets"] = {"popqa": config["datasets"]["popqa"]}
    config["models"] = {"llama2-7b": config["models"]["llama2-7b"]}
    config["subsets"] = ["top", "whole"]
    config["seeds"] = [0]
    config["evaluate"]["fewshot"] = 0
    config["finetune"].update({"packing": False, **finetune})
    out = path / "config.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def test_hours_are_each_jobs_work_over_the_measured_rates(tmp_path, capsys):
    speed = speed_table(tmp_path)
    config = small_config(tmp_path, epochs=3)
    (work,) = grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    pool, test = 7_000, 3_000  # test_fraction 0.3
    tokens = 3 * (0.5 + 1.0) * pool * 20  # 3 epochs of FT-Top (half the pool) and FT-Whole, 20 tokens each
    questions = test * 3  # two finetuned models' and the base model's evaluations
    assert work["finetune_tokens"] == pytest.approx(tokens)
    assert work["questions"] == pytest.approx(questions)
    assert work["forward_tokens"] == {"factft": 0, "baseline": 0}  # popularity from a column, no few-shot or choices
    assert work["factft"] == pytest.approx((tokens / 20_000 + questions / 600) / 3600)
    assert work["baseline"] == pytest.approx((tokens / 8_000 + questions / 60) / 3600)
    printed = capsys.readouterr().out
    assert "finetune LoRA q,v: factft 20,000 real tokens/s (goal >= 17,000): met; 2.50x the baseline" in printed
    assert "evaluate, 16 new tokens: factft-one-round 600 questions/s (goal >= 500): met" in printed
    assert "answers that end as a finetuned model's: factft-one-round 1,500 questions/s, 15.00x the baseline" in printed
    assert "peak 11.5 GB allocated, on the examples (goal <= 24 GB): met" in printed


def test_compiled_blocks_add_their_compile_time_to_every_finetune_job(tmp_path, capsys):
    speed = speed_table(tmp_path, compiled_tps=25_000.0)
    (eager,) = grid_hours.main([str(speed), "--config", str(small_config(tmp_path)), "--size", "popqa=10000"])
    config = small_config(tmp_path, compile=True)
    (compiled,) = grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    assert compiled["finetunes"] == 2
    seconds = compiled["finetune_tokens"] / 25_000 + 2 * 90 + compiled["questions"] / 600
    assert compiled["factft"] == pytest.approx(seconds / 3600)
    assert compiled["baseline"] == pytest.approx(eager["baseline"])  # the plain path compiles nothing
    printed = capsys.readouterr().out
    assert "factft    finetune 25,000 real tokens/s (+ 90 s compiling a job)" in printed
    assert "finetune LoRA q,v: factft-compiled 25,000 real tokens/s (goal >= 17,000): met" in printed
    with pytest.raises(SystemExit, match="finetune.compile: the reference rates are of an eager loop"):
        grid_hours.main([str(speed), "--reference", "--config", str(config), "--size", "popqa=10000"])
    with pytest.raises(SystemExit, match="compile: bench/speed.py measures it without packing"):
        grid_hours.main([str(speed), "--config", str(small_config(tmp_path, compile=True, packing=True))])


def test_the_static_caches_compile_time_is_paid_once_in_every_job_that_generates(tmp_path, capsys):
    speed = speed_table(tmp_path)
    table = pd.read_csv(speed, sep="\t")
    static = table[(table["path"] == "factft-one-round") & (table["variant"] == "lora-qv adapter")]
    static = static.assign(path="factft-static")
    static[["questions_per_s", "compile_s"]] = (900.0, 70.0)
    pd.concat([table, static]).to_csv(speed, sep="\t", index=False)
    config = small_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["evaluate"]["static_cache"] = True
    config.write_text(yaml.safe_dump(settings))
    (work,) = grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    seconds = work["finetune_tokens"] / 20_000 + work["questions"] / 900 + work["evaluations"] * 70
    assert work["factft"] == pytest.approx(seconds / 3600)
    assert "evaluate 900.0 questions/s (+ 70 s compiling a job)" in capsys.readouterr().out


def test_every_gpu_job_loads_the_model_once_at_the_measured_time(tmp_path, capsys):
    config = small_config(tmp_path)
    (unmeasured,) = grid_hours.main([str(speed_table(tmp_path)), "--config", str(config), "--size", "popqa=10000"])
    assert "not counted: loading a model in each of 7 GPU jobs" in capsys.readouterr().out
    speed = speed_table(tmp_path, load_s=20.0)
    (work,) = grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    assert work["loads"] == 2 + 3 + 2  # finetunes, evaluations (with the base model's), attention analyses
    for who in ("factft", "baseline"):
        assert work[who] == pytest.approx(unmeasured[who] + 7 * 20 / 3600)
    # The longest job is FT-Whole, 3 epochs of the 7,000-fact pool; an evaluation, 3,000 questions.
    assert unmeasured["finetune_min"] == pytest.approx(3 * 7_000 * 20 / 20_000 / 60)
    assert unmeasured["evaluate_min"] == pytest.approx(3_000 / 600 / 60)
    assert work["finetune_min"] == pytest.approx(unmeasured["finetune_min"] + 20 / 60)
    printed = capsys.readouterr().out
    assert "counted: loading a model in each of 7 GPU jobs, 20 s each as measured (13.48 GB of safetensors" in printed
    grid_hours.main([str(speed), "--reference", "--config", str(config), "--size", "popqa=10000"])
    assert "not counted: loading" in capsys.readouterr().out  # a load measured beside the reference rates is not theirs


@pytest.mark.slow
def test_the_jobs_that_load_a_model_are_the_gpu_jobs_of_the_workflows_plan(tmp_path):
    snakemake = Path(sys.executable).parent / "snakemake"
    plan = subprocess.run(
        [str(snakemake), "all", "-n", "--configfile", "config/config.yaml"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    gpu_jobs = re.findall(r"^\s*resources: .*\bgpu=1\b", plan.stdout, re.MULTILINE)
    speed = speed_table(tmp_path)
    works = grid_hours.main([str(speed), "--config", str(ROOT / "config" / "config.yaml")])
    assert sum(work["loads"] for work in works) == len(gpu_jobs) == 206  # MMLU ranked by each model: 2 scorers


def test_goals_missed_are_said_so(tmp_path, capsys):
    # The graphs row, faster, is no config setting yet: the goal is judged on the paths a config selects.
    speed = speed_table(tmp_path, factft_tps=15_000.0, factft_qps=400.0, qlora_gb=30.0, graphs_tps=40_000.0)
    grid_hours.main([str(speed), "--config", str(small_config(tmp_path)), "--size", "popqa=10000"])
    printed = capsys.readouterr().out
    assert "factft 15,000 real tokens/s (goal >= 17,000): MISSED; 1.88x the baseline (goal >= 2x): MISSED" in printed
    assert "400 questions/s (goal >= 500): MISSED" in printed
    assert "peak 30.0 GB allocated, on the examples (goal <= 24 GB): MISSED" in printed


def test_a_second_tables_rows_join_the_first_and_24_gb_must_hold_reserved_memory_and_context(tmp_path, capsys):
    """gpu_check.sh's second call (QLoRA, when the first hit its limit) writes its own table."""
    first = speed_table(tmp_path)  # its checkpointed row: 11.5 GB allocated, no reserved memory recorded
    columns = ["date", "device", "device_name", "stage", "variant", "path", "peak_gb", "peak_reserved_gb", "context_gb"]
    second = pd.DataFrame(
        [("2026-11-30", "cuda", "NVIDIA H200", "finetune", "qlora-all", "factft-packed-gc", 11.0, 12.0, 0.6),
         ("2026-11-30", "cuda", "NVIDIA H200", "finetune", "qlora-all", "factft-packed-gc-long", 20.5, 23.7, 0.6)],
        columns=columns,
    )  # fmt: skip
    second.to_csv(tmp_path / "speed-2.tsv", sep="\t", index=False)
    sources = [str(first), str(tmp_path / "speed-2.tsv")]
    grid_hours.main([*sources, "--config", str(small_config(tmp_path)), "--size", "popqa=10000"])
    printed = capsys.readouterr().out
    assert f"rates measured in {sources[0]} + {sources[1]}" in printed
    # 20.5 GB allocated would pass; 23.7 GB reserved and the 0.6 GB context do not.
    assert "peak 24.3 GB reserved + CUDA context, at max_length (goal <= 24 GB): MISSED" in printed


def test_max_steps_and_few_shot_change_the_work(tmp_path):
    speed = speed_table(tmp_path)
    config = yaml.safe_load(small_config(tmp_path, max_steps=100).read_text())
    config["evaluate"]["fewshot"] = 5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (work,) = grid_hours.main([str(speed), "--config", str(tmp_path / "config.yaml"), "--size", "popqa=10000"])
    assert work["finetune_tokens"] == pytest.approx(2 * 100 * 16 * 20)  # two subsets, 100 steps of 16
    assert work["questions"] == pytest.approx(3_000 * 4)  # and the base model once more, 5-shot
    assert work["forward_tokens"] == pytest.approx({"factft": 3_000 * 5 * 20, "baseline": 3_000 * 5 * 20})  # demonstrations


def test_a_datasets_own_finetune_settings_set_its_work(tmp_path):
    speed = speed_table(tmp_path)
    config = yaml.safe_load(small_config(tmp_path, epochs=3).read_text())
    config["datasets"]["popqa"]["finetune"] = {"epochs": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (work,) = grid_hours.main([str(speed), "--config", str(tmp_path / "config.yaml"), "--size", "popqa=10000"])
    assert work["finetune_tokens"] == pytest.approx(1 * (0.5 + 1.0) * 7_000 * 20)  # 1 epoch, not the block's 3


@pytest.mark.parametrize("lettered", [True, False], ids=["options-and-letters", "cloze"])
def test_multiple_choice_runs_a_prompt_once_for_factft_and_once_per_choice_the_plain_way(tmp_path, lettered):
    raw = yaml.safe_load(small_config(tmp_path).read_text())
    full = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    raw["datasets"] = {"mmlu": full["datasets"]["mmlu"]}  # scored by llama2-7b's 4-shot confidence
    if not lettered:
        del raw["datasets"]["mmlu"]["prompt"]  # the question alone, each choice's text after it
    raw["evaluate"]["fewshot"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    (work,) = grid_hours.main([str(speed_table(tmp_path)), "--config", str(tmp_path / "config.yaml"), "--size", "mmlu=1000"])
    # A question is 55 tokens and a choice's text 15. Shown as options ("A. " + text), the four
    # add 4 x 17 to the prompt and each choice is scored as its letter (1 token).
    prompt, target = (55 + 4 * 17, 1) if lettered else (55, 15)
    test, tokens = 300, prompt + target
    popularity = 1000 * 5 * tokens
    assert work["questions"] == 0
    # Each evaluation of a question: its prompt once, then the 4 choices; the 2-shot one adds
    # two solved examples. The plain way: prompt and choice, 4 times.
    factft = test * (4 * (prompt + 4 * target) + 2 * tokens) + popularity
    baseline = test * 4 * tokens * (3 + 3) + popularity  # the 2-shot evaluation is 3 examples long
    assert work["forward_tokens"] == pytest.approx({"factft": factft, "baseline": baseline})
    assert work["evaluations"] == 4  # two finetuned runs, the base model, its 2-shot evaluation
    assert work["evaluate_min"] == pytest.approx(test * (prompt + 4 * target) / (2 * 20_000) / 60)  # forward-only, 2x


def test_reference_rates_scale_by_the_tables_real_token_share(tmp_path):
    speed = speed_table(tmp_path, device="cpu")
    config = small_config(tmp_path)
    (work,) = grid_hours.main([str(speed), "--reference", "--config", str(config), "--size", "popqa=10000"])
    factft = grid_hours.REFERENCE_TOKENS_PER_S["lora-qv"] * 2000 / 2100
    assert work["factft"] == pytest.approx(
        (work["finetune_tokens"] / factft + work["questions"] / grid_hours.REFERENCE_QUESTIONS_PER_S["factft"]) / 3600
    )


def test_finetuning_rates_are_read_at_the_configs_batch_size(tmp_path):
    # A step's fixed cost makes the rate depend on the batch: a table measured at another batch
    # (say bench/speed.py --batch-size 128 layered over the first) must not stand in for it.
    speed = speed_table(tmp_path, batch_size=128)
    with pytest.raises(SystemExit, match=r"path factft at batch size 16; rerun bench/speed.py --batch-size 16"):
        grid_hours.main([str(speed), "--config", str(small_config(tmp_path)), "--size", "popqa=10000"])
    config = small_config(tmp_path, batch_size=128)
    (work,) = grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    assert work["factft"] == pytest.approx((work["finetune_tokens"] / 20_000 + work["questions"] / 600) / 3600)


def test_a_missing_row_or_size_is_named(tmp_path):
    speed = speed_table(tmp_path)
    config = small_config(tmp_path, packing=True)
    with pytest.raises(SystemExit, match="no row for stage finetune, variant lora-qv, path factft-packed"):
        grid_hours.main([str(speed), "--config", str(config), "--size", "popqa=10000"])
    with pytest.raises(SystemExit, match=r"no size for datasets \['myqa'\]"):
        raw = yaml.safe_load(config.read_text())
        raw["datasets"]["myqa"] = raw["datasets"].pop("popqa")
        config.write_text(yaml.safe_dump(raw))
        grid_hours.main([str(speed), "--config", str(config)])
    with pytest.raises(SystemExit, match="missing.tsv: no such speed table"):
        grid_hours.main([str(tmp_path / "missing.tsv"), "--config", str(config)])


def test_a_config_the_workflow_would_refuse_is_one_line_naming_it(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(small_config(tmp_path).read_text() + "bogus: 1\n")
    refused = r"config.yaml: Additional properties are not allowed \('bogus' was unexpected\)$"
    with pytest.raises(SystemExit, match=refused):
        grid_hours.main([str(speed_table(tmp_path)), "--config", str(config), "--size", "popqa=10000"])
