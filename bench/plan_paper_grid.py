"""How long Snakemake takes to plan the paper's grid (`snakemake -n all` on config/config.yaml).

    .venv/bin/python bench/plan_paper_grid.py [--repeat N]

Planning runs on every invocation (a dry run, a cluster submission, a rerun), so it should stay
well under the 3 s goal. Prints the best and median wall time of N runs, the CPU time and the job count.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 3.0


def plan_once() -> tuple[float, float, subprocess.CompletedProcess]:
    snakemake = Path(sys.executable).parent / "snakemake"
    # The target goes first: --configfile takes every argument after it.
    command = [str(snakemake), "all", "-n", "--configfile", "config/config.yaml"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # CPU time as well: on a shared, busy machine wall time overstates what planning costs.
    before, start = os.times(), time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, os.times()
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    times, cpus = [], []
    for _ in range(args.repeat):
        seconds, cpu, result = plan_once()
        times.append(seconds)
        cpus.append(cpu)
    if result.returncode != 0:
        print(f"snakemake -n all failed (exit {result.returncode}); last lines:")
        print("\n".join((result.stdout + result.stderr).splitlines()[-15:]))
    total = re.search(r"^total\s+(\d+)$", result.stdout, re.MULTILINE)
    jobs = total.group(1) if total else "?"
    best, median = min(times), statistics.median(times)
    verdict = "within" if median < GOAL_S else "OVER"
    print(
        f"plan of config/config.yaml: {jobs} jobs; wall best {best:.2f} s, median {median:.2f} s of {len(times)} "
        f"({verdict} the {GOAL_S:.0f} s goal); CPU median {statistics.median(cpus):.2f} s"
    )
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
