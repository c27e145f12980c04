"""bench/grid_usage.py: what a run used, per rule, from the benchmark files Snakemake wrote."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from snakemake.benchmark import BenchmarkRecord

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_grid_usage", ROOT / "bench" / "grid_usage.py")
grid_usage = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(grid_usage)


def benchmark(folder: Path, job: str, seconds: float, rss_mb: float | str = 900.0) -> None:
    """A benchmark file as Snakemake writes it (its header; "NA" where it sampled nothing)."""
    path = folder / f"{job}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = BenchmarkRecord.get_header()
    values = [f"{seconds:.4f}", "0:00:00", rss_mb, rss_mb, rss_mb, rss_mb, 1.0, 1.0, 50.0, seconds / 2]
    path.write_text("\t".join(header) + "\n" + "\t".join(map(str, values)) + "\n")


def test_usage_sums_each_rules_jobs_and_counts_hub_model_jobs_as_gpu_hours(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    for seed, seconds in ((0, 1800.0), (1, 3600.0)):
        benchmark(folder, f"finetune/llama2-7b/popqa/top/seed{seed}", seconds, rss_mb=20_000.0)
    benchmark(folder, "evaluate/mistral-7b/popqa/top/seed0", 120.0)
    benchmark(folder, "popularity/mmlu/by-llama2-7b", 600.0)  # model_confidence: llama2-7b ranks its runs' facts
    benchmark(folder, "popularity/mmlu", 600.0)  # ranked so before the model was part of the path
    benchmark(folder, "popularity/popqa", 5.0, rss_mb="NA")  # a column: CPU, too short to sample
    benchmark(folder, "split/popqa/whole", 3.0)
    benchmark(folder, "figures/llama2-7b/popqa", 30.0)
    benchmark(folder, "finetune/gpt2/popqa/top/seed0", 999.0)  # a model the config no longer has
    benchmark(folder, "evaluate/llama2-7b/nq/top/seed0", 999.0)  # nor this dataset
    benchmark(folder, "evaluate/llama2-7b/popqa/top25/seed0", 999.0)  # nor this subset
    benchmark(folder, "attention/llama2-7b/popqa/top/seed7", 999.0)  # nor this seed
    benchmark(folder, "subset/popqa/top25", 1.0)
    benchmark(folder, "metrics/llama2-7b/popqa/top/seed0", 2.0)  # scores predictions: no model, a CPU
    benchmark(folder, "metrics/gpt2/popqa/top/seed0", 999.0)  # predictions of a model the config lacks
    benchmark(folder, "metrics/llama2-7b/popqa/top/seed7", 999.0)  # nor this seed
    benchmark(folder, "sized_split/popqa/top", 999.0)  # layouts before 2026-12-02: one split job per
    benchmark(folder, "split/popqa", 999.0)  # dataset, sized subsets cut by sized_split
    benchmark(folder, "size_figure/llama2-7b/popqa", 999.0)  # drawn only when the config has sized subsets
    benchmark(folder, "simulate/zipf/0.5/seed0", 4.0)
    benchmark(folder, "simulate/zipf/1.0/seed0", 999.0)  # the base value: read from the base runs since
    benchmark(folder, "simulate/zipf/0.5/seed9", 999.0)  # a seed the config no longer has

    table = grid_usage.main(["--benchmarks", str(folder), "--out", str(tmp_path / "usage.tsv")])
    rows = table.set_index("rule")
    assert rows.loc["finetune", "device"] == "gpu" and rows.loc["finetune", "jobs"] == 2
    assert rows.loc["finetune", "hours"] == pytest.approx(1.5)
    assert rows.loc["finetune", "median_min"] == pytest.approx(45.0)
    assert rows.loc["finetune", "longest_min"] == pytest.approx(60.0)
    assert rows.loc["finetune", "longest_job"] == "llama2-7b/popqa/top/seed1"
    assert rows.loc["finetune", "max_rss_gb"] == pytest.approx(20.0)
    assert rows.loc["popularity", "device"].tolist() == ["gpu", "cpu"]
    assert rows.loc["split", "device"] == rows.loc["figures", "device"] == rows.loc["metrics", "device"] == "cpu"
    assert rows.loc["split", "hours"] == pytest.approx(3.0 / 3600)
    assert (tmp_path / "usage.tsv").read_text().startswith("rule\tdevice\tjobs")
    printed = capsys.readouterr().out
    assert rows.loc["simulate", "jobs"] == 1 and rows.loc["simulate", "device"] == "cpu"
    assert f"9 jobs of {grid_usage.ROOT / 'config/config.yaml'}" in printed
    assert f"4 on a GPU: {(1800 + 3600 + 120 + 600) / 3600:.2f} GPU-h" in printed
    assert "GPU-h by model/dataset: llama2-7b/mmlu 0.17, llama2-7b/popqa 1.50, mistral-7b/popqa 0.03" in printed
    assert "left out: 13 files of models, datasets, subsets, seeds or simulation points not in the config" in printed


def test_a_folder_without_benchmarks_of_the_config_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        grid_usage.main(["--benchmarks", str(tmp_path / "missing")])
    benchmark(tmp_path / "benchmarks", "finetune/gpt2/popqa/top/seed0", 10.0)
    with pytest.raises(SystemExit, match="no benchmark files of .*config.yaml's jobs"):
        grid_usage.main(["--benchmarks", str(tmp_path / "benchmarks")])
    (tmp_path / "benchmarks/split").mkdir()
    (tmp_path / "benchmarks/split/popqa.tsv").write_text("seconds\n1\n")
    with pytest.raises(SystemExit, match="popqa.tsv: not a Snakemake benchmark file"):
        grid_usage.main(["--benchmarks", str(tmp_path / "benchmarks")])


def test_a_pair_the_grid_leaves_out_is_not_counted(tmp_path):
    """A model pretrained here runs on its own world alone (rules/common.smk, experiments()):
    benchmark files of it on another dataset are from an earlier workflow."""
    config = yaml.safe_load((grid_usage.ROOT / "config/demo.yaml").read_text())
    config["datasets"]["myqa"] = {"source": {"path": "myqa.csv"}, "popularity": {"scorer": "column", "column": "v"},
                                  "keep_columns": ["v"]}  # fmt: skip
    config["datasets"]["mcqa"] = {"source": {"path": "mcqa.csv"}, "popularity": {"scorer": "model_confidence"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    config = grid_usage.load_config(tmp_path / "config.yaml")
    assert grid_usage.job_model(config, "finetune", "tiny/synth/top/seed0") == ("tiny", "synth")
    assert grid_usage.job_model(config, "finetune", "tiny/myqa/top/seed0") is None
    assert grid_usage.job_model(config, "split", "myqa/top") == (None, "myqa")
    # Ranked by each finetuned model's own confidence: not by one that cannot read it.
    assert grid_usage.job_model(config, "popularity", "mcqa/by-tiny") is None
    assert grid_usage.job_model(config, "split", "mcqa/by-tiny/top") is None


def test_a_model_limited_to_some_datasets_is_counted_where_it_runs_or_ranks(tmp_path):
    """models.<name>.datasets: its runs elsewhere are from an earlier config, but a dataset it
    ranks as popularity.model has that scoring job planned all the same."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["models"]["mistral-7b"]["datasets"] = ["popqa"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    limited = grid_usage.load_config(tmp_path / "config.yaml")
    assert grid_usage.job_model(limited, "finetune", "mistral-7b/popqa/top/seed0") == ("mistral-7b", "popqa")
    assert grid_usage.job_model(limited, "finetune", "mistral-7b/mmlu/top/seed0") is None
    assert grid_usage.job_model(limited, "metrics", "mistral-7b/mmlu/top/seed0") is None
    assert grid_usage.job_model(limited, "popularity", "mmlu/by-mistral-7b") is None  # no run of it to rank for
    assert grid_usage.job_model(limited, "split", "mmlu/by-llama2-7b/test") == (None, "mmlu")
    config["datasets"]["mmlu"]["popularity"]["model"] = "mistral-7b"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    ranker = grid_usage.load_config(tmp_path / "config.yaml")
    assert grid_usage.job_model(ranker, "popularity", "mmlu/by-mistral-7b") == ("mistral-7b", "mmlu")
    assert grid_usage.job_model(ranker, "popularity", "mmlu/by-llama2-7b") is None
