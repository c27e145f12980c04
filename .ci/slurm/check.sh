#!/usr/bin/env bash
# CI: the workflow on a real one-node SLURM cluster, through the site profile.
#
#  1. install and start the cluster (.ci/slurm/cluster.sh); stop it on any exit
#  2. run config/ci-slurm.yaml with `--profile profiles/slurm` in a scratch folder (never
#     the repository's results/), every rule a SLURM job
#  3. check that nothing is left to do, and the jobs (.ci/slurm/verify.py): completed,
#     GPU rules asked for a GPU and saw CUDA_VISIBLE_DEVICES, all ran offline
#  4. preemption: rerun one finetune, `scontrol requeue` it once it has written a
#     checkpoint, and check that it resumed and ended with the uninterrupted run's metrics
#
# Runs twice in a row on one machine. FACTFT_SLURM_DIR moves the scratch folder.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${FACTFT_SLURM_DIR:-/tmp/factft-slurm}
export FACTFT_SLURM_DIR=$ROOT
WORK=$ROOT/work
PROFILE=$REPO/profiles/slurm
PYTHON=$REPO/.venv/bin/python
CLUSTER=$REPO/.ci/slurm/cluster.sh
# The finetune run the preemption check requeues (names from config/ci-slurm.yaml).
RUN=results/tiny/synth/top/seed0
START=$SECONDS

say() { echo "[slurm-ci] $*" >&2; }

# SIGTERM does not stop a Snakemake that waits on SLURM; SIGINT does (and cancels its jobs).
snakemake_ci() {
    local limit=$1
    shift
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 timeout -s INT -k 30 "$limit" \
        "$PYTHON" -m snakemake --snakefile "$REPO/Snakefile" --profile "$PROFILE" \
        --configfile "$REPO/config/ci-slurm.yaml" --slurm-keep-successful-logs \
        --slurm-init-seconds-before-status-checks 2 --retries 0 "$@"
}

bash "$CLUSTER" install
trap 'bash "$CLUSTER" stop' EXIT
bash "$CLUSTER" start

rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"

say "workflow on SLURM (log: $ROOT/run.log)"
if ! snakemake_ci 420 all >"$ROOT/run.log" 2>&1; then
    tail -n 60 "$ROOT/run.log" >&2
    say "FAILED: the workflow run on SLURM (log: $ROOT/run.log)"
    exit 1
fi
say "workflow done after $((SECONDS - START)) s"

if ! snakemake_ci 120 --dry-run all 2>&1 | grep -q "Nothing to be done"; then
    say "FAILED: jobs are left after the run: snakemake -n plans more"
    exit 1
fi
"$PYTHON" "$REPO/.ci/slurm/verify.py" "$WORK" "$PROFILE/config.yaml"

say "preemption: requeue a finetune job after its first checkpoint"
cp "$RUN/metrics.tsv" "$ROOT/metrics.uninterrupted.tsv"
snakemake_ci 300 --forcerun finetune -- "$RUN/metrics.tsv" >"$ROOT/requeue.log" 2>&1 &
snakemake_pid=$!
for _ in $(seq 1500); do
    compgen -G "$RUN/checkpoints/step-*/state.json" >/dev/null && break
    kill -0 "$snakemake_pid" 2>/dev/null || break
    sleep 0.2
done
jobid=$(squeue -h -o "%i %k" | awk '$2 ~ /^rule_finetune_/ {print $1; exit}')
if [[ -z $jobid ]] || ! compgen -G "$RUN/checkpoints/step-*/state.json" >/dev/null; then
    wait "$snakemake_pid" || true
    tail -n 40 "$ROOT/requeue.log" >&2
    say "FAILED: no running finetune job with a checkpoint to requeue (raise finetune.max_steps?)"
    exit 1
fi
scontrol requeue "$jobid"
# A requeued job may start only after a delay (about 2 min); a preempted job on a busy
# cluster waits for its resources anyway, so the check skips the delay.
scontrol update jobid="$jobid" StartTime=now
if ! wait "$snakemake_pid"; then
    tail -n 60 "$ROOT/requeue.log" >&2
    say "FAILED: the requeued run (log: $ROOT/requeue.log)"
    exit 1
fi
finetune_log=logs/finetune/${RUN#results/}.log
restarts=$(scontrol show job "$jobid" | grep -o "Restarts=[0-9]*")
resumed=$(grep -o "resuming from .*" "$finetune_log" || true)
say "job $jobid: $restarts; $resumed"
if [[ $restarts != Restarts=1 || -z $resumed ]]; then
    say "FAILED: job $jobid was not requeued and resumed from a checkpoint ($finetune_log)"
    exit 1
fi
if ! cmp -s "$ROOT/metrics.uninterrupted.tsv" "$RUN/metrics.tsv"; then
    diff "$ROOT/metrics.uninterrupted.tsv" "$RUN/metrics.tsv" >&2 || true
    say "FAILED: the requeued run's metrics differ from the uninterrupted run's"
    exit 1
fi
say "OK: requeued finetune resumed and matched the uninterrupted metrics"
say "SLURM check passed in $((SECONDS - START)) s"
