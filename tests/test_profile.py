"""The SLURM profile (profiles/slurm): found by name from the repository root and by path,
it plans the workflow for the slurm executor offline (a dry run needs no cluster), with one
GPU for each job that runs a hub model, memory and runtime that grow with the attempt, and the rules that need
the internet kept on the login node. .ci/slurm/check.sh runs it on a real cluster."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
# Rules whose jobs run a model: on a GPU for a hub model, on CPU for the demo's tiny one.
GPU_RULES = {"finetune", "evaluate", "evaluate_base", "evaluate_fewshot", "cloze"}
# Rules that must never hold a GPU (others, like popularity, ask for one themselves when needed).
CPU_RULES = {"download", "download_model", "pageviews", "synthetic_world", "pretrain", "split"}
INTERNET_RULES = {"download", "download_model", "pageviews"}

# One job of a dry run's listing: "rule NAME:" and its indented fields.
JOB = re.compile(r"^rule (\w+):\n((?:    .*\n)+)", re.M)


@dataclass
class PlannedJob:
    rule: str
    wildcards: str
    resources: dict[str, str]
    benchmark: str
    inputs: str = ""


def dry_run(
    profile: str | None, configfile: str, workdir: Path, *extra: str, target: str = "all"
) -> tuple[str, list[PlannedJob]]:
    """`snakemake --profile <profile> -n <target>` from the repository root, in an empty workdir."""
    profile_args = ["--profile", profile] if profile else []
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", target, *profile_args, "--configfile", configfile,
         "--directory", str(workdir), "--dry-run", *extra],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = []
    for match in JOB.finditer(output):
        fields = dict(line.strip().split(": ", 1) for line in match[2].splitlines() if ": " in line)
        resources = dict(item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item)
        wildcards, benchmark, inputs = (fields.get(key, "") for key in ("wildcards", "benchmark", "input"))
        jobs.append(PlannedJob(match[1], wildcards, resources, benchmark, inputs))
    return output, [job for job in jobs if job.rule != target]


def localrules() -> set[str]:
    """Names in the `localrules:` blocks of rules/*.smk (a dry run does not show them)."""
    names = set()
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.findall(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", smk.read_text(), re.M):
            names |= set(re.findall(r"\w+", block))
    return names


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The paper's grid planned through the profile named as the README says."""
    return dry_run("slurm", "config/config.yaml", tmp_path_factory.mktemp("grid"))


@pytest.fixture(scope="module")
def grid_second_attempt(tmp_path_factory):
    # --attempt is how Snakemake starts a job's retry; a dry run shows its resources.
    return dry_run("slurm", "config/config.yaml", tmp_path_factory.mktemp("retry"), "--attempt", "2")


def test_profile_found_by_name_from_the_repository_root_plans_the_paper_grid(grid):
    output, jobs = grid
    # The workflow's own profile (profiles/default: content checks) is read beside it.
    assert "Using profiles slurm and workflow specific profile profiles/default for" in output
    # No cloze: the grid has no synthetic world.
    assert {job.rule for job in jobs} >= GPU_RULES - {"cloze"} | {"download_model", "popularity", "split"}


def ci_gpu_rules() -> set[str]:
    """The rules whose jobs .ci/slurm/check.sh gives a GPU on the CI cluster (its GPU_RULES)."""
    return set(re.search(r"^GPU_RULES=\((.*)\)$", (REPO / ".ci" / "slurm" / "check.sh").read_text(), re.M)[1].split())


def test_profile_found_by_path_plans_every_gpu_rule_of_the_ci_cluster_config(tmp_path):
    gpu_rules = ci_gpu_rules()
    assert gpu_rules == GPU_RULES
    given = [f"{rule}:gpu=1" for rule in sorted(gpu_rules)]
    output, jobs = dry_run("profiles/slurm", "config/ci-slurm.yaml", tmp_path, "--set-resources", *given)
    assert "Using profiles profiles/slurm and workflow specific profile profiles/default for" in output
    # .ci/slurm/verify.py expects a job of each of these rules on the CI cluster, each with a GPU,
    # and no GPU in any other job.
    assert {job.rule for job in jobs} >= gpu_rules
    assert {job.rule for job in jobs if job.resources.get("gpu", "0") == "1"} == gpu_rules


def test_through_the_profile_the_tiny_models_jobs_hold_no_gpu(tmp_path):
    _, jobs = dry_run("slurm", "config/ci-slurm.yaml", tmp_path)
    assert {job.rule for job in jobs} >= GPU_RULES | {"pretrain"}
    assert {job.resources.get("gpu", "0") for job in jobs} == {"0"}


def test_gpu_jobs_ask_for_one_gpu_and_cpu_jobs_for_none(grid):
    _, jobs = grid
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    scored_by_a_7b_model = {
        name for name, d in config["datasets"].items() if d["popularity"]["scorer"] == "model_confidence"
    }
    assert scored_by_a_7b_model, "config.yaml no longer has a model_confidence dataset to check"
    scorings = set()
    for job in jobs:
        gpus = job.resources.get("gpu", "0")
        # A data job's {ranked}: the dataset, or dataset/by-<model> where a model ranks it.
        ranked = dict(w.split("=", 1) for w in job.wildcards.split(", ") if "=" in w).get("ranked", "")
        if job.rule in GPU_RULES:
            assert gpus == "1", job
        elif job.rule in CPU_RULES:
            assert gpus == "0", job
        elif job.rule == "popularity":
            assert gpus == ("1" if ranked.split("/")[0] in scored_by_a_7b_model else "0"), job
            scorings.add(ranked)
    # Without popularity.model, each model ranks the facts of its own runs.
    assert {r for r in scorings if "/" in r} == {f"{d}/by-{m}" for d in scored_by_a_7b_model for m in config["models"]}


@pytest.mark.parametrize(("configfile", "gpus"), [("config/config.yaml", "1"), ("config/demo.yaml", "0")])
def test_without_the_profile_7b_jobs_still_hold_a_gpu_and_the_tiny_model_none(tmp_path, configfile, gpus):
    # On a GPU workstation, `--resources gpu=1` then runs the 7B jobs one at a time.
    _, jobs = dry_run(None, configfile, tmp_path, "--cores", "2")
    model_jobs = [job for job in jobs if job.rule in GPU_RULES | {"attention"}]
    assert {job.rule for job in model_jobs} >= {"finetune", "evaluate", "evaluate_base"}
    assert {job.resources.get("gpu", "0") for job in model_jobs} == {gpus}
    # The heatmaps show one question under FT-Top and under FT-Bottom, the paper's contrast.
    heatmaps = [job for job in jobs if job.rule == "attention_figures"]
    assert heatmaps
    for job in heatmaps:
        examples = re.findall(r"/(\w+)/seed\d+/attention_example\.tsv", job.inputs)
        assert sorted(examples) == ["bottom", "top"], job


def test_rules_that_need_the_internet_run_on_the_login_node_and_gpu_rules_do_not(grid):
    _, jobs = grid
    assert {"download", "download_model", "pageviews"} <= {job.rule for job in jobs}
    local = localrules()
    assert INTERNET_RULES <= local
    assert not GPU_RULES & local


def test_rules_that_only_draw_tables_and_figures_run_on_the_login_node():
    # Seconds of pandas and plotting (envs/figures.yaml): not worth a queued job each.
    drawing = set()
    for smk in (REPO / "rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):\n((?:    .*\n|\n)+)", smk.read_text(), re.M):
            if '"../envs/figures.yaml"' in body:
                drawing.add(rule)
    assert {"summary", "figures", "overview", "simulation_mechanism_figures"} <= drawing
    assert drawing <= localrules(), drawing - localrules()


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/ci-slurm.yaml"])
def test_memory_and_runtime_double_with_the_attempt(configfile, grid, grid_second_attempt, tmp_path):
    if configfile == "config/config.yaml":
        planned = grid[1], grid_second_attempt[1]
    else:  # the synthetic world's rules: pretraining and the world itself
        planned = [dry_run("slurm", configfile, tmp_path / str(n), "--attempt", str(n))[1] for n in (1, 2)]
    local = localrules()
    first, second = ({(j.rule, j.wildcards): j.resources for j in jobs if j.rule not in local} for jobs in planned)
    assert first.keys() == second.keys() and first
    if configfile != "config/config.yaml":
        assert {"pretrain", "synthetic_world"} <= {rule for rule, _ in first}
    for key, resources in first.items():
        for name in ("mem_mb", "runtime"):
            # Doubled: a 7B finetune cut at its time limit resumes with as much time again.
            assert int(second[key][name]) == 2 * int(resources[name]), (key, name)


def test_a_full_finetune_asks_for_twice_the_host_memory(grid, tmp_path):
    """Its fp32 weights pass through host memory at load and at each checkpoint (27 GB for a 7B)."""
    # --attempt 1 (the default) ends --config's list before dry_run's target.
    full_popqa = ("--config", "datasets={popqa: {finetune: {method: full}}}", "--attempt", "1")
    _, jobs = dry_run("slurm", "config/config.yaml", tmp_path, *full_popqa)
    memory = {(j.rule, j.wildcards): int(j.resources["mem_mb"]) for j in jobs if j.rule in ("finetune", "evaluate")}
    usual = {(j.rule, j.wildcards): int(j.resources["mem_mb"]) for j in grid[1] if (j.rule, j.wildcards) in memory}
    assert memory.keys() == usual.keys() and memory
    for (rule, wildcards), mb in memory.items():
        full = rule == "finetune" and "dataset=popqa," in wildcards + ","
        assert mb == (2 if full else 1) * usual[rule, wildcards] == (2 if full else 1) * 32000, (rule, wildcards)
    assert sum(rule == "finetune" and mb == 64000 for (rule, _), mb in memory.items()) == 2 * 4 * 3


def test_a_models_own_resources_size_its_jobs_alone(grid, tmp_path):
    """models.<name>.resources: a small model on CPU nodes, or a larger one given more."""
    small = ("--config", "models={mistral-7b: {resources: {gpu: 0, mem_mb: 6000, finetune_runtime: 50}}}")
    _, jobs = dry_run("slurm", "config/config.yaml", tmp_path, *small, "--attempt", "1")
    usual = {(j.rule, j.wildcards): j.resources for j in grid[1]}
    model_jobs = [j for j in jobs if j.rule in GPU_RULES | {"attention", "popularity"} and "mistral-7b" in j.wildcards]
    assert {j.rule for j in model_jobs} >= {"finetune", "evaluate", "popularity"}
    for job in model_jobs:
        runtime = {"finetune": "50", "popularity": "120"}.get(job.rule, "120")  # scoring: at least an hour
        assert (job.resources.get("gpu", "0"), job.resources["mem_mb"], job.resources["runtime"]) == (
            "0", "6000", runtime
        ), job
    others = [j for j in jobs if j.rule in GPU_RULES and "llama2-7b" in j.wildcards]
    assert others and all(j.resources == usual[j.rule, j.wildcards] for j in others)
    spec = importlib.util.spec_from_file_location("bench_grid_usage", REPO / "bench" / "grid_usage.py")
    grid_usage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_usage)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"]["mistral-7b"]["resources"] = {"gpu": 0}
    assert (grid_usage.job_device(config, "mistral-7b"), grid_usage.job_device(config, "llama2-7b")) == ("cpu", "gpu")


def test_the_profile_asks_for_no_gpu_itself():
    # The rules ask for one exactly when a job runs a hub model; a profile request would also
    # give the tiny model's jobs a GPU, and a --set-resources on the command line would drop it.
    profile = yaml.safe_load(PROFILE.read_text())
    for resources in [profile["default-resources"], *profile.get("set-resources", {}).values()]:
        assert "gpu" not in resources
        # The plugin rejects --gres/--gpus in slurm_extra; the GPU must be the `gpu` resource.
        assert not re.search(r"--(gres|gpus)", str(resources.get("slurm_extra", "")))


def test_only_the_theory_models_jobs_go_to_slurm_as_job_arrays(grid, tmp_path):
    # The plugin runs an array's first task without srun and without the profile's precommand
    # (HF_HUB_OFFLINE): fine for `simulate`, which needs neither a GPU nor the hub.
    spec = importlib.util.spec_from_file_location("ci_verify", REPO / ".ci" / "slurm" / "verify.py")
    verify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify)
    arrays = verify.array_rules(PROFILE.parent)
    assert arrays == {"simulate"}
    _, jobs = grid
    assert sum(job.rule == "simulate" for job in jobs) == 105
    assert {job.resources.get("gpu", "0") for job in jobs if job.rule in arrays} == {"0"}
    # The CI cluster runs them as one array (verify.py checks): it needs two jobs at least.
    _, ci_jobs = dry_run("slurm", "config/ci-slurm.yaml", tmp_path)
    assert sum(job.rule == "simulate" for job in ci_jobs) >= 2


def test_the_data_target_plans_every_split_table_of_the_grid_and_no_model_run(grid, tmp_path):
    # README: after a data edit, `data` first, so that runs whose tables come out the same are
    # left alone (Snakemake plans a run again when a job before it is planned).
    _, jobs = grid
    _, data_jobs = dry_run("slurm", "config/config.yaml", tmp_path, target="data")

    def tables(planned):
        return sorted((job.rule, job.wildcards) for job in planned if job.rule in ("split", "subset"))

    assert tables(data_jobs) == tables(jobs) and len(tables(jobs)) > 10
    assert {job.rule for job in data_jobs} <= {"download", "pageviews", "download_model", "popularity", "split", "subset"}


def test_grid_usage_counts_as_gpu_jobs_exactly_those_the_rules_give_a_gpu(grid):
    """bench/grid_usage.py tells GPU jobs from their benchmark paths: the same jobs as the plan's."""
    spec = importlib.util.spec_from_file_location("bench_grid_usage", REPO / "bench" / "grid_usage.py")
    grid_usage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_usage)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    _, jobs = grid
    planned = [job for job in jobs if job.benchmark]
    assert len(planned) == len(jobs)  # every rule has a benchmark file
    for job in planned:
        rule, _, name = job.benchmark.removeprefix("benchmarks/").removesuffix(".tsv").partition("/")
        model, _ = grid_usage.job_model(config, rule, name)
        device = "gpu" if job.resources.get("gpu", "0") == "1" else "cpu"
        assert grid_usage.job_device(config, model) == device, job


def test_a_site_sets_a_rules_runtime_in_the_profile_as_an_expression_of_the_attempt(tmp_path):
    """The SITE override the profile documents: it replaces the rule's runtime, still by attempt."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile.setdefault("set-resources", {})["finetune"] = {"runtime": "90 * attempt"}
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "config.yaml").write_text(yaml.safe_dump(profile))
    for attempt, minutes in (("1", "90"), ("2", "180")):
        _, jobs = dry_run(str(tmp_path / "site"), "config/ci-slurm.yaml", tmp_path / attempt, "--attempt", attempt)
        finetunes = [job for job in jobs if job.rule == "finetune"]
        assert finetunes and {job.resources["runtime"] for job in finetunes} == {minutes}
        assert {job.resources["runtime"] for job in jobs if job.rule == "evaluate"} == {str(15 * int(attempt))}
