"""Whose popularity ranks a dataset: a model_confidence scorer puts the scoring model in the
path (results/{dataset}/by-{model}/), and without popularity.model each finetuned model ranks
the facts of its own runs, so its FT-Top holds the facts it knows best."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factft.tables import read_table

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "other")


def two_model_config(tmp_path: Path, **popularity) -> Path:
    """config/ci-slurm.yaml's tiny world, scored by model confidence, with a second tiny model."""
    config = yaml.safe_load((ROOT / "config/ci-slurm.yaml").read_text())
    config["datasets"]["synth"]["popularity"] = {"scorer": "model_confidence", "shots": 1, **popularity}
    pretrain = config["models"]["tiny"]["source"]["pretrain"]
    config["models"]["other"] = {"source": {"pretrain": dict(pretrain, seed=1)}}
    config["finetune"]["max_steps"] = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(config: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(
        # Targets first: --configfile takes every argument up to the next flag.
        [sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
         "--configfile", str(config), "--cores", "2"],
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def finetune_inputs(plan: str) -> dict[str, str]:
    """model -> the split table its FT-Top finetune reads, from a dry run's listing."""
    found = {}
    for job in re.findall(r"^rule finetune:\n((?:    .*\n)+)", plan, re.M):
        model = re.search(r"wildcards: model=([\w-]+)", job)[1]
        found[model] = re.search(r"input: \S+, (\S+)", job)[1]
    return found


@pytest.mark.slow
def test_without_a_scoring_model_each_model_ranks_the_facts_of_its_own_runs(tmp_path):
    config, work = two_model_config(tmp_path), tmp_path / "work"
    seeds = {"tiny": 0, "other": 1}
    targets = [f"results/{model}/synth/top/seed{seeds[model]}/adapter" for model in MODELS]
    snakemake(config, work, *targets, *[f"results/synth/by-{model}/splits/test.parquet" for model in MODELS])
    # Each model pretrained with its own block, each run finetuned with its own labels.
    models = yaml.safe_load(config.read_text())["models"]
    for model, target in zip(MODELS, targets):
        block = models[model]["source"]["pretrain"]
        pretrained = json.loads((work / f"resources/models/{model}/pretrain.json").read_text())
        assert {key: pretrained[key] for key in block} == block
        trained = json.loads((work / target / "trained.json").read_text())
        labels = (trained["dataset"], trained["subset"], trained["seed"], trained["steps"])
        assert labels == ("synth", "top", seeds[model], 2)
    tops, tests = {}, {}
    for model in MODELS:
        folder = work / f"results/synth/by-{model}"
        assert set(read_table(folder / "facts.parquet")["popularity_source"]) == {f"model_confidence:{model}:1-shot"}
        tops[model] = set(read_table(folder / "splits/top.parquet")["id"])
        tests[model] = set(read_table(folder / "splits/test.parquet")["id"])
    assert tops["tiny"] != tops["other"]  # two models know different facts best
    assert tests["tiny"] == tests["other"]  # held out by subject, whoever ranks
    plan = snakemake(config, work, *targets, "-n", "--forcerun", "finetune").stdout
    assert finetune_inputs(plan) == {m: f"results/synth/by-{m}/splits/top.parquet" for m in MODELS}
    # Scoring runs in evaluate.batch_size's batches: how a job runs, so a change scores nothing again.
    settings = yaml.safe_load(config.read_text())
    settings["evaluate"]["batch_size"] *= 2
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert "Nothing to be done" in snakemake(config, work, *targets, "-n").stdout


def test_a_named_scoring_model_ranks_the_facts_of_every_run(tmp_path):
    config = two_model_config(tmp_path, model="tiny")
    targets = [f"results/{model}/synth/top/seed0/adapter" for model in MODELS]
    plan = snakemake(config, tmp_path / "work", *targets, "-n").stdout
    assert finetune_inputs(plan) == {m: "results/synth/by-tiny/splits/top.parquet" for m in MODELS}
    assert re.search(r"^popularity\s+1$", plan, re.M)
    # A tiny scoring model runs on a CPU: its job holds no GPU (a CPU-only cluster could not run it).
    popularity = re.search(r"^rule popularity:\n((?:    .*\n)+)", plan, re.M)[1]
    assert re.search(r"resources: .*\bgpu=0\b", popularity), popularity
