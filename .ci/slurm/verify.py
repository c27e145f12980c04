"""Check a finished workflow run on the CI's SLURM cluster (called by .ci/slurm/check.sh).

Run in the workflow's working directory, after Snakemake returned: every job SLURM ran for
it completed; the rules check.sh gives a GPU (the arguments) asked SLURM for one and saw it
(CUDA_VISIBLE_DEVICES in the job step, and in the rule's own log where it logs it); no
other job got one; the jobs of the profile's `slurm-array-jobs` rules ran as array tasks, and
no others; every job but an array's first task ran with the hub offline. The job steps' environment comes from the
cluster's TaskProlog (.ci/slurm/cluster.sh), the GPU request from `scontrol show job` (kept
MinJobAge = 300 s after a job ends).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

PROLOG = re.compile(
    r"^slurm-ci: job=(?P<job>\d+) step=(?P<step>\S+) "
    r"CUDA_VISIBLE_DEVICES=(?P<gpus>\S*) HF_HUB_OFFLINE=(?P<offline>\S*)$",
    re.M,
)
RULE_LOG_GPUS = re.compile(r"CUDA_VISIBLE_DEVICES=(\S+?)\)?$", re.M)
ARRAY_TASK = re.compile(r"^\d+_\d+$")


def array_rules(profile: Path) -> set[str]:
    """The rules the profile sends to SLURM as job arrays (its `slurm-array-jobs`)."""
    setting = yaml.safe_load((profile / "config.yaml").read_text()).get("slurm-array-jobs") or ""
    return set(re.split(r"[,;\s]+", setting.strip())) - {""}


def job_record(jobid: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", jobid], capture_output=True, text=True, check=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def check_jobs(workdir: Path, expected_gpu: set[str], expected_array: set[str]) -> list[str]:
    problems, seen = [], set()
    logs = sorted((workdir / ".snakemake" / "slurm_logs").glob("rule_*/**/*.log"))
    if not logs:
        return ["no SLURM job logs under .snakemake/slurm_logs (run with --slurm-keep-successful-logs)"]
    print(f"{'rule':<18}{'job':>6}  {'state':<10}{'gpu request':<14}{'CUDA_VISIBLE_DEVICES':<22}HF_HUB_OFFLINE")
    for log in logs:
        rule = log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        jobid = log.stem
        seen.add(rule)
        record = job_record(jobid)
        asked = "gpu" in record.get("TresPerJob", "") + record.get("TresPerNode", "")
        # The rule runs in step 0 (the srun inside the batch script); after a requeue the
        # appended log holds one line per run: the last one is the run that finished.
        lines = list(PROLOG.finditer(log.read_text()))
        steps = [m for m in lines if m["step"] == "0"]
        in_array = bool(ARRAY_TASK.match(jobid))
        # The plugin runs an array's first task in the batch step itself, without srun and
        # without the profile's precommand: the profile allows arrays only where neither matters.
        in_batch_step = in_array and not steps
        if in_batch_step:
            steps = [m for m in lines if m["step"] == "batch"]
        gpus, offline = (steps[-1]["gpus"], steps[-1]["offline"]) if steps else ("?", "?")
        state = f"{record.get('JobState')} {record.get('ExitCode')}"
        print(f"{rule:<18}{jobid:>6}  {record.get('JobState', '?'):<10}{str(asked):<14}{gpus or '-':<22}{offline or '-'}")
        where = f"rule {rule}, SLURM job {jobid} ({log})"
        if state != "COMPLETED 0:0":
            problems.append(f"{where}: state {state}")
        if not steps:
            problems.append(f"{where}: no job step line from the TaskProlog")
            continue
        if in_array != (rule in expected_array):
            problems.append(f"{where}: ran as an array task {in_array}, expected {rule in expected_array}")
        wants_gpu = rule in expected_gpu
        if asked != wants_gpu:
            problems.append(f"{where}: GPU requested {asked}, expected {wants_gpu}")
        if bool(gpus) != wants_gpu:
            problems.append(f"{where}: CUDA_VISIBLE_DEVICES='{gpus}' in the job step")
        if offline != "1" and not in_batch_step:
            problems.append(f"{where}: HF_HUB_OFFLINE='{offline}' (the profile's precommand sets it)")
    for kind, rules in (("GPU", expected_gpu), ("array", expected_array)):
        if rules - seen:
            problems.append(f"{kind} rules that never ran as SLURM jobs: {sorted(rules - seen)}")
    return problems


def check_rule_logs(workdir: Path, expected_gpu: set[str]) -> list[str]:
    """Rules that log CUDA_VISIBLE_DEVICES (finetune does) saw the job's GPU themselves."""
    problems, found = [], 0
    for rule in sorted(expected_gpu):
        for log in sorted((workdir / "logs" / rule).rglob("*.log")):
            values = RULE_LOG_GPUS.findall(log.read_text())
            if values:
                found += 1
                if values[-1] in ("None", ""):
                    problems.append(f"{log}: the rule saw no CUDA_VISIBLE_DEVICES")
    print(f"rule logs naming CUDA_VISIBLE_DEVICES: {found}")
    return problems


def main(workdir: str, profile: str, *gpu_rules: str) -> int:
    """Check the run in `workdir`, made with `profile`, whose jobs of `gpu_rules` (and no others)
    were given a GPU."""
    expected = set(gpu_rules)
    problems = check_jobs(Path(workdir), expected, array_rules(Path(profile)))
    problems += check_rule_logs(Path(workdir), expected)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
