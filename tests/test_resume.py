"""A finetune job killed with SIGKILL at any point resumes, when the workflow is rerun, from its
last complete checkpoint and ends with the adapter and metrics of an uninterrupted run.

The real thing: `snakemake` in a subprocess, its whole process group killed. The kill points
are deterministic: a test-only sitecustomize (on PYTHONPATH for the killed run alone) halts
the finetune job at a named point and says so in a marker file; the test then kills.
Nothing is replaced, only paused: every write is the workflow's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from factft.generate import evaluate_model
from factft.split import split_facts
from factft.tables import read_table, write_table

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
RUN = Path("results/tinyp/synth/top/seed0")
TARGET = str(RUN / "adapter")
STEP = "step-{:08d}"

STALL_HOOK = r'''
"""Test hook: halt a finetune job at $FACTFT_STALL, write $FACTFT_STALL_MARKER, wait to be killed."""
import importlib.abc, importlib.machinery, os, re, sys, time
from contextlib import contextmanager
from pathlib import Path

POINT = os.environ.get("FACTFT_STALL")


def stall():
    marker = os.environ["FACTFT_STALL_MARKER"]
    Path(marker + ".part").write_text(str(os.getpid()))
    os.replace(marker + ".part", marker)
    while True:
        time.sleep(60)


def patch(train):
    save_checkpoint, atomic_dir, torch_save = train.save_checkpoint, train.atomic_dir, train.torch.save

    def save_checkpoint_then_stall(directory, step, *args, **kwargs):
        save_checkpoint(directory, step, *args, **kwargs)
        if POINT == f"after-checkpoint:{step}":
            stall()

    @contextmanager
    def atomic_dir_stalling_before_rename(target):
        with atomic_dir(target) as tmp:
            yield tmp
            if POINT == f"before-rename:{Path(target).name}":
                stall()

    def torch_save_then_stall(obj, path, *args, **kwargs):
        torch_save(obj, path, *args, **kwargs)
        # A checkpoint's optimizer state is the second of its four files.
        if isinstance(path, (str, os.PathLike)):
            step = re.match(r"\.step-(\d+)\.", Path(path).parent.name)
            if step and POINT == f"mid-checkpoint:{int(step[1])}":
                stall()

    train.save_checkpoint = save_checkpoint_then_stall
    train.atomic_dir = atomic_dir_stalling_before_rename
    train.torch.save = torch_save_then_stall


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "factft.train":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if POINT:
    sys.meta_path.insert(0, Hook())
'''


def make_facts() -> pd.DataFrame:
    """24 facts about 12 subjects in the words of conftest's tiny model."""
    first, last = ["Ilmo", "Bera", "Kalo", "Suna", "Ito", "Vena"], ["Varsk", "Tosk"]
    towns, jobs = ["Lyon", "Paris", "Rome", "Oslo", "Milan"], ["doctor", "baker", "pilot"]
    rows = []
    for i, who in enumerate(f"{a} {b}" for b in last for a in first):
        rows.append((f"b{i}", f"Where was {who} born ?", [towns[i % 5]], who, "born", 100.0 - i))
        rows.append((f"w{i}", f"What does {who} do ?", [jobs[i % 3]], who, "works", 50.0 - i))
    return pd.DataFrame(rows, columns=["id", "question", "answers", "subject", "relation", "popularity"])


@pytest.fixture(scope="module")
def workflow_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A config and the finetune rule's inputs (model folder, splits); each run copies them."""
    folder = tmp_path_factory.mktemp("resume")
    for name, table in split_facts(make_facts(), dataset="synth", test_fraction=0.25, seed=0).items():
        write_table(table, folder / f"results/synth/splits/{name}.parquet")
    config = {
        "seeds": [0],
        "subsets": ["top"],
        "datasets": {"synth": {"source": {"synthetic": {"subjects": 12}}, "popularity": {"scorer": "pretraining_count"}}},
        "models": {"tinyp": {"source": {"path": str(tiny_model_dir)}}},
        # 8 facts in top, batches of 2: 10 steps (2.5 epochs); checkpoints after steps 2, 4, 6, 8.
        "finetune": {
            "method": "lora",
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"},
            "max_steps": 10,
            "batch_size": 2,
            "learning_rate": 0.01,
            "checkpoint_every": 2,
            "max_length": 32,
        },
        "evaluate": {"max_new_tokens": 2, "batch_size": 8, "percentiles": [50, 100]},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def stall_hook(tmp_path_factory) -> Path:
    """A folder to put on PYTHONPATH: its sitecustomize halts the finetune job at $FACTFT_STALL."""
    folder = tmp_path_factory.mktemp("hook")
    (folder / "sitecustomize.py").write_text(STALL_HOOK)
    return folder


def fresh_copy(workflow_dir: Path, into: Path) -> Path:
    shutil.copytree(workflow_dir, into)
    return into


def snakemake(workdir: Path, *extra: str) -> list[str]:
    # Targets first: --allowed-rules takes every argument up to the next flag.
    return [
        str(SNAKEMAKE), TARGET, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile",
        str(workdir / "config.yaml"), "--cores", "1", "--allowed-rules", "finetune", *extra,
    ]  # fmt: skip


def env(**extra) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


def run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake(workdir, *extra), env=env(), capture_output=True, text=True, timeout=300)


def run_and_kill_at(workdir: Path, hook: Path, point: str, *, snakemake_only: bool = False) -> int:
    """Run the workflow until the finetune job reaches `point`, then SIGKILL the process group
    (or Snakemake alone, whose job then runs on, halted); returns the job's pid."""
    marker = workdir.parent / f"{workdir.name}-{point.replace(':', '-')}.stalled"
    output = workdir.parent / f"{workdir.name}-{point.replace(':', '-')}.out"
    with open(output, "w") as stream:
        process = subprocess.Popen(
            snakemake(workdir),
            env=env(PYTHONPATH=str(hook), FACTFT_STALL=point, FACTFT_STALL_MARKER=str(marker)),
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before reaching {point}:\n{output.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the run did not reach {point} in 300 s")
        time.sleep(0.05)
    stalled = int(marker.read_text())
    if snakemake_only:
        process.kill()
        process.wait()
        return stalled
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_dead(stalled)
    return stalled


def assert_dead(pid: int) -> None:
    """The finetune job died with snakemake: it was in the killed process group."""
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie until its new parent reaps it; its state says so.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    pytest.fail(f"finetune process {pid} survived the kill of its process group")


def unlock(workdir: Path) -> None:
    """What a user does after a crash: release the lock that the killed run held."""
    done = run(workdir, "--unlock")
    assert done.returncode == 0, done.stderr[-3000:]


def finetune_log(workdir: Path) -> str:
    return (workdir / "logs/finetune/tinyp/synth/top/seed0.log").read_text()


def checkpoints(workdir: Path) -> list[str]:
    folder = workdir / RUN / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def complete(checkpoint: Path) -> bool:
    return (checkpoint / "state.json").is_file()


@pytest.mark.slow
def test_finetune_killed_at_three_points_resumes_to_the_uninterrupted_adapter_and_metrics(
    workflow_dir, stall_hook, tmp_path
):
    reference = fresh_copy(workflow_dir, tmp_path / "reference")
    # The uninterrupted run goes on meanwhile: its result does not depend on the other's.
    with open(tmp_path / "reference.out", "w") as output:
        uninterrupted = subprocess.Popen(snakemake(reference), env=env(), stdout=output, stderr=subprocess.STDOUT)
    work = fresh_copy(workflow_dir, tmp_path / "killed")
    hook = stall_hook

    # 1. Right after the first checkpoint is written.
    run_and_kill_at(work, hook, "after-checkpoint:2")
    assert checkpoints(work) == [STEP.format(2)] and complete(work / RUN / "checkpoints" / STEP.format(2))
    assert not (work / RUN / "adapter").exists() and not (work / RUN / "train_log.tsv").exists()

    # 2. In the middle of writing a later checkpoint.
    unlock(work)
    run_and_kill_at(work, hook, "mid-checkpoint:6")
    assert f"resuming from {RUN}/checkpoints/{STEP.format(2)} (step 2 of 10)" in finetune_log(work)
    (half_written,) = [name for name in checkpoints(work) if name.startswith(f".{STEP.format(6)}.")]
    assert sorted(p.name for p in (work / RUN / "checkpoints" / half_written).iterdir()) == [
        "optimizer.pt",
        "trainable.safetensors",
    ]
    assert checkpoints(work) == [half_written, STEP.format(4)]
    assert complete(work / RUN / "checkpoints" / STEP.format(4))

    # 3. During the final write: train_log.tsv is written, the adapter not yet renamed into place.
    unlock(work)
    run_and_kill_at(work, hook, "before-rename:adapter")
    log = finetune_log(work)
    assert f"resuming from {RUN}/checkpoints/{STEP.format(4)} (step 4 of 10)" in log
    assert f"removing {RUN}/checkpoints/{half_written}, left by an interrupted run" in log
    assert (work / RUN / "train_log.tsv").is_file() and not (work / RUN / "adapter").exists()
    assert any(p.name.startswith(".adapter.") for p in (work / RUN).iterdir())
    assert checkpoints(work) == [STEP.format(8)]

    # Snakemake knows train_log.tsv is incomplete: it refuses to go on without being told.
    unlock(work)
    refused = run(work)
    assert refused.returncode != 0 and "incomplete" in refused.stderr.lower()
    assert (work / RUN / "train_log.tsv").is_file()

    # --rerun-incomplete deletes the declared outputs; the undeclared checkpoints survive.
    done = run(work, "--rerun-incomplete")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {RUN}/checkpoints/{STEP.format(8)} (step 8 of 10)" in finetune_log(work)
    assert not (work / RUN / "checkpoints").exists()
    assert sorted(p.name for p in (work / RUN).iterdir()) == ["adapter", "train_log.tsv"]

    assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "reference.out").read_text()[-3000:]
    assert "resuming" not in finetune_log(reference)
    assert_same_result(reference / RUN, work / RUN)
    assert_same_predictions(reference, work)


@pytest.mark.slow
def test_a_finetune_that_a_killed_snakemake_left_running_is_not_run_twice(workflow_dir, stall_hook, tmp_path):
    work = fresh_copy(workflow_dir, tmp_path / "orphaned")
    # Snakemake alone dies (a lost login node); its finetune job runs on, here halted after step 2.
    orphan = run_and_kill_at(work, stall_hook, "after-checkpoint:2", snakemake_only=True)
    try:
        os.kill(orphan, 0)  # still running
        unlock(work)
        second = run(work, "--rerun-incomplete")
        assert second.returncode != 0
        assert "another finetune of this run is running (host " in second.stderr
        assert f", pid {orphan}, " in second.stderr, second.stderr[-3000:]
        # The running copy's checkpoint and its place are untouched.
        assert checkpoints(work) == [STEP.format(2)] and complete(work / RUN / "checkpoints" / STEP.format(2))
        assert (work / RUN / "checkpoints.lock").is_file()
    finally:
        os.kill(orphan, signal.SIGKILL)
    assert_dead(orphan)
    done = run(work, "--rerun-incomplete")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {RUN}/checkpoints/{STEP.format(2)} (step 2 of 10)" in finetune_log(work)
    assert sorted(p.name for p in (work / RUN).iterdir()) == ["adapter", "train_log.tsv"]


def assert_same_result(expected: Path, found: Path) -> None:
    weights = load_file(expected / "adapter/adapter_model.safetensors")
    resumed = load_file(found / "adapter/adapter_model.safetensors")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[name], resumed[name]) for name in weights)
    assert json.loads((expected / "adapter/trained.json").read_text()) == json.loads(
        (found / "adapter/trained.json").read_text()
    )
    # Everything but the measured throughput, which is the one thing a run's speed decides.
    columns = ["step", "epoch", "loss", "lr", "tokens"]
    log = pd.read_csv(expected / "train_log.tsv", sep="\t")
    assert len(log) == 10
    pd.testing.assert_frame_equal(log[columns], pd.read_csv(found / "train_log.tsv", sep="\t")[columns])


def assert_same_predictions(expected: Path, found: Path) -> None:
    """The held-out predictions, made as the evaluate rule makes them (here, to spare two jobs' start-up)."""
    config = yaml.safe_load((expected / "config.yaml").read_text())
    spec = {"name": "tinyp", "path": config["models"]["tinyp"]["source"]["path"], "trust_remote_code": False}
    params = dict(config["evaluate"], format="open", prompt={"template": "Q: {question} A:", "answer": " {answer}"})
    test = read_table(expected / "results/synth/splits/test.parquet")
    results = [evaluate_model(spec, test, params, adapter=root / RUN / "adapter", device="cpu") for root in (expected, found)]
    predictions, resumed_predictions = results
    assert len(predictions) == len(test) > 0
    pd.testing.assert_frame_equal(predictions, resumed_predictions)
