"""What a run of the workflow used, job by job, from the benchmark files Snakemake wrote.

    python bench/grid_usage.py                              # config/config.yaml, benchmarks/
    python bench/grid_usage.py --config config/demo.yaml --out usage.tsv

Every rule has `benchmark: benchmarks/<rule>/<wildcards>.tsv`: the job's wall seconds, CPU
seconds and peak host memory. This sums them per rule (jobs, hours, median and longest job,
largest memory) and counts the GPU hours: the jobs that ran a hub model (finetune, the
evaluations, attention, a model_confidence scorer) had one GPU each; the tiny demo model runs
on CPU. What it prints is the compute to report with results, the measured counterpart of
bench/grid_hours.py's estimate, and what the runtime and memory asked of SLURM
(rules/common.smk) can be set against. A job retried with --retries, or requeued, left the
times of its last attempt only. Files of models, datasets, subsets, seeds or simulation points
no longer in the config, or of an earlier layout of the rules, are left out, and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))

from snakemake.exceptions import WorkflowError  # noqa: E402

from factft import subsets  # noqa: E402
from factft.config import load_config, model_resources, ranking_models, runs_on  # noqa: E402
from factft.errors import FactftError  # noqa: E402
from factft.popularity import SCORERS  # noqa: E402
from factft.sweeps import run_of, sweep_points  # noqa: E402

# Scorers that rank by a model: their datasets' files sit under by-<model>/.
MODEL_SCORERS = {name for name, scorer in SCORERS.items() if scorer.needs_model}

# Rules whose benchmark path starts with {model}: they run that model (rules/evaluate.smk,
# rules/finetune.smk), on a GPU when it is a hub model (rules/common.smk, model_gpus).
MODEL_RULES = ("finetune", "evaluate", "evaluate_base", "evaluate_fewshot", "cloze", "attention")
# Rules whose benchmark path is an evaluation's, {model}/{dataset}/..., but that run no model:
# they score its answers and make its metrics, on a CPU (rules/evaluate.smk).
SCORING_RULES = ("score", "metrics")
# Rules whose benchmark path starts with {dataset} or {ranked} (rules/data.smk).
DATASET_RULES = ("popularity", "split", "subset", "pageviews")
# Benchmark folders of layouts before 2026-12-02 (one split job per dataset, sized_split).
EARLIER_RULES = ("sized_split",)
COLUMNS = ["rule", "device", "jobs", "hours", "cpu_hours", "median_min", "longest_min", "longest_job", "max_rss_gb"]


def read_benchmarks(folder: Path) -> pd.DataFrame:
    """One row per job: rule, job (its wildcards as a path), seconds, cpu_seconds, rss_mb."""
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        parts = path.relative_to(folder).with_suffix("").parts
        if len(parts) < 2:
            continue
        # Snakemake writes "-" (or NA) where a job was too short to sample.
        table = pd.read_csv(path, sep="\t", na_values=["-", "NA"])
        if table.empty or "s" not in table.columns:
            raise SystemExit(f"{path}: not a Snakemake benchmark file (no 's' column)")
        last = table.iloc[-1]  # `repeat` benchmarks add rows; a job ran the last
        rows.append(
            {
                "rule": parts[0],
                "job": "/".join(parts[1:]),
                "seconds": float(last["s"]),
                "cpu_seconds": float(last.get("cpu_time", float("nan"))),
                "rss_mb": float(last.get("max_rss", float("nan"))),
            }
        )
    return pd.DataFrame(rows, columns=["rule", "job", "seconds", "cpu_seconds", "rss_mb"])


def job_model(config: dict, rule: str, job: str) -> tuple[str | None, str | None] | None:
    """The model a job ran (None for a job that runs none) and its dataset (None for a job of
    no dataset); None for a job of a model, dataset, subset or seed the config lacks."""
    first, *rest = job.split("/")
    if rule == "size_figure" and not any(subsets.is_sized(name) for name in config["subsets"]):
        return None  # drawn only with sized subsets: a file of an earlier config
    if rule in EARLIER_RULES:
        return None
    if rule in MODEL_RULES or rule in SCORING_RULES:
        model, dataset = first, rest[0]
    elif rule in DATASET_RULES:
        # {ranked}: the dataset, or dataset/by-<model> where a model's confidence ranks it
        # (rules/common.smk, ranked()).
        scorer = rest.pop(0).removeprefix("by-") if rest and rest[0].startswith("by-") else None
        popularity = config["datasets"].get(first, {}).get("popularity", {})
        if (scorer is None) == (popularity.get("scorer") in MODEL_SCORERS):
            return None  # a file of an earlier ranking
        if scorer is not None and scorer not in ranking_models(config, first):
            return None  # ranked by a model the config lacks, or one that no longer ranks it
        model, dataset = (scorer if rule == "popularity" else None), first
        if rule == "split" and not rest:
            return None  # {ranked}/{part} since 2026-12-02
    elif rule == "simulate":  # {sweep}/{point}/seed{seed}
        return (None, None) if simulation_run_is_current(config["simulation"], first, *rest) else None
    else:
        return None, None
    if (model is not None and model not in config["models"]) or dataset not in config["datasets"]:
        return None
    if (rule in MODEL_RULES or rule in SCORING_RULES) and not runs_on(config, model, dataset):
        return None  # a pair the grid leaves out (another world's model, or one not in models.<m>.datasets)
    if rule == "subset" and rest[0] not in config["subsets"]:  # {ranked}/{cut}
        return None
    if (rule in MODEL_RULES or rule in SCORING_RULES) and len(rest) == 3:  # a run: .../{subset}/seed{seed}
        subset, seed = rest[1], rest[2].removeprefix("seed")
        if subset not in config["subsets"] or not seed.isdigit() or int(seed) not in config["seeds"]:
            return None
    return (None if rule in SCORING_RULES else model), dataset


def simulation_run_is_current(simulation: dict, sweep: str, point: str, seed: str) -> bool:
    """A run of a point and seed the config has; a point at the base settings reads the base runs."""
    seed = seed.removeprefix("seed")
    return (
        point in sweep_points(simulation).get(sweep, [])
        and run_of(simulation, sweep, point) == (sweep, point)
        and seed.isdigit()
        and int(seed) in simulation["seeds"]
    )


def job_device(config: dict, model: str | None) -> str:
    """A job that runs a model had a GPU unless its resources say none (rules/common.smk, model_gpus)."""
    return "gpu" if model is not None and model_resources(config, model)["gpu"] else "cpu"


def usage_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule and device: jobs, wall and CPU hours, median and longest job, largest memory."""
    out = []
    for (rule, device), group in jobs.groupby(["rule", "device"], sort=False):
        longest = group.loc[group["seconds"].idxmax()]
        out.append(
            {
                "rule": rule,
                "device": device,
                "jobs": len(group),
                "hours": group["seconds"].sum() / 3600,
                "cpu_hours": group["cpu_seconds"].sum() / 3600,
                "median_min": group["seconds"].median() / 60,
                "longest_min": longest["seconds"] / 60,
                "longest_job": longest["job"],
                "max_rss_gb": group["rss_mb"].max() / 1000,
            }
        )
    table = pd.DataFrame(out, columns=COLUMNS)
    return table.sort_values(["device", "hours"], ascending=[False, False], ignore_index=True)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--benchmarks", type=Path, default=Path("benchmarks"), help="the run's benchmarks/ folder")
    parser.add_argument("--out", type=Path, help="also write the table here (tsv)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, FactftError, WorkflowError) as error:  # unreadable, or fails the schema or its checks
        first = " ".join(str(error).split("\n\n")[0].splitlines())
        raise SystemExit(f"{args.config}: {first}") from None
    if not args.benchmarks.is_dir():
        raise SystemExit(f"{args.benchmarks}: no such folder; run the workflow first (from the repository root)")
    jobs = read_benchmarks(args.benchmarks)
    ran = [job_model(config, rule, job) for rule, job in zip(jobs["rule"], jobs["job"])]
    known = [found is not None for found in ran]
    other = len(jobs) - sum(known)
    jobs = jobs[known].assign(
        model=[found[0] for found in ran if found is not None],
        dataset=[found[1] for found in ran if found is not None],
        device=[job_device(config, found[0]) for found in ran if found is not None],
    )
    if jobs.empty:
        raise SystemExit(f"{args.benchmarks}: no benchmark files of {args.config}'s jobs")
    table = usage_table(jobs)

    gpu = jobs[jobs["device"] == "gpu"]
    print(
        f"{args.benchmarks}: {len(jobs)} jobs of {args.config}, {jobs['seconds'].sum() / 3600:.2f} h in all; "
        f"{len(gpu)} on a GPU: {gpu['seconds'].sum() / 3600:.2f} GPU-h"
    )
    if other:
        print(
            f"  left out: {other} files of models, datasets, subsets, seeds or simulation points not in the config, "
            "or of earlier rules"
        )
    shown = table.assign(longest_job=table["longest_job"].str.slice(0, 40))
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if len(gpu):
        per_pair = gpu.groupby(["model", "dataset"])["seconds"].sum()
        print("GPU-h by model/dataset: " + ", ".join(f"{m}/{d} {s / 3600:.2f}" for (m, d), s in per_pair.items()))
    if args.out:
        table.round(4).to_csv(args.out, sep="\t", index=False)
    return table


if __name__ == "__main__":
    main()
