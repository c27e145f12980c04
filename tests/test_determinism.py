"""The demo is deterministic on CPU: run twice, in two folders with two hash seeds, it writes
byte-identical splits and identical metrics. The same two runs carry an HF token in their
environment, which must reach no file (it is checked here to spare a third run of the workflow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SPLITS = [f"results/synth/splits/{name}.parquet" for name in ("top", "bottom", "random", "whole", "test")]
RUN = "results/tiny/synth/top/seed0"
TARGETS = [*SPLITS, f"{RUN}/metrics.tsv"]
SECRET = "hf_test_secret_Zq7Xv3Lm9Kp2Wr5Tn8Bc4Yd6"
# Everything a run writes: what it computes and fetches, its logs, benchmarks and Snakemake's own records.
WRITTEN = ("results", "resources", "logs", "benchmarks", ".snakemake")


def shrunken_demo() -> dict:
    """config/demo.yaml, shrunk to seconds: a small world, a one-layer model, one finetune run."""
    config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
    config.pop("simulation", None)
    config.update(seeds=[0], subsets=["top"])
    config["split"].update(test_fraction=0.25, pool_size=None, test_size=None)
    config["datasets"]["synth"]["source"]["synthetic"].update(
        subjects=40, relations=2, answers_per_relation=5, mentions=400
    )
    config["models"]["tiny"]["source"]["pretrain"].update(
        hidden_size=16, layers=1, heads=2, intermediate_size=32, epochs=1, batch_size=32, seq_len=32
    )
    config["finetune"].update(max_steps=6, batch_size=8, checkpoint_every=2, max_length=32)
    config["evaluate"].update(max_new_tokens=2, percentiles=[50, 100])
    return config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    folders = [tmp_path_factory.mktemp(f"demo{i}") for i in (1, 2)]
    for folder in folders:
        (folder / "config.yaml").write_text(yaml.safe_dump(shrunken_demo()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_TOKEN=SECRET)
    # Side by side: neither run can lean on the other's files, and the pair takes half as long.
    runs = []
    # Two hash seeds: an output that follows the order of a set would differ.
    for folder, hash_seed in zip(folders, ("0", "123")):
        with open(folder / "snakemake.out", "w") as output:
            runs.append(
                subprocess.Popen(
                    # Targets first: --configfile takes every argument up to the next flag.
                    [str(SNAKEMAKE), *TARGETS, "-s", str(ROOT / "Snakefile"), "-d", str(folder),
                     "--configfile", str(folder / "config.yaml"), "--cores", "1"],
                    env=dict(env, PYTHONHASHSEED=hash_seed), stdout=output, stderr=subprocess.STDOUT,
                )  # fmt: skip
            )
    for folder, run in zip(folders, runs):
        assert run.wait(timeout=600) == 0, (folder / "snakemake.out").read_text()[-3000:]
    return folders


@pytest.mark.slow
def test_two_demo_runs_write_byte_identical_splits_and_identical_metrics(two_runs):
    first, second = two_runs
    # The adapter's config too: peft holds all-linear's layers in a set.
    written = [f"{RUN}/answers.parquet", f"{RUN}/predictions.parquet", "results/synth/facts.parquet", f"{RUN}/adapter/adapter_config.json"]
    for path in TARGETS + written:
        assert (first / path).read_bytes() == (second / path).read_bytes(), f"{path} differs between the runs"
    adapters = [load_file(run / RUN / "adapter/adapter_model.safetensors") for run in two_runs]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    # Training ran through its checkpoints and cleared them.
    assert not (first / RUN / "checkpoints").exists()
    assert "checkpoint results/tiny/synth/top/seed0/checkpoints/step-00000002" in (
        first / "logs/finetune/tiny/synth/top/seed0.log"
    ).read_text()


@pytest.mark.slow
def test_an_hf_token_in_the_environment_reaches_no_output_log_benchmark_or_record(two_runs):
    secret = SECRET.encode()
    scanned, leaks = 0, []
    for run in two_runs:
        assert os.environ.get("HF_TOKEN") != SECRET  # the runs had it; this process does not
        for top in WRITTEN:
            for path in (run / top).rglob("*"):
                if path.is_file() and not path.is_symlink():
                    scanned += 1
                    if secret in path.read_bytes():
                        leaks.append(str(path.relative_to(run)))
        assert SECRET not in (run / "snakemake.out").read_text()
    assert scanned > 40, "the runs wrote fewer files than a demo does"
    assert leaks == []
