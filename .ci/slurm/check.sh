#!/usr/bin/env bash
# CI: the workflow on a real one-node SLURM cluster, through the site profile.
#
#  1. install and start the cluster (.ci/slurm/cluster.sh); stop it on any exit
#  2. run config/ci-slurm.yaml with `--profile profiles/slurm` in a scratch folder (never
#     the repository's results/), every rule but the localrules (splits, scoring, metrics, tables,
#     figures) a SLURM job
#  3. check that every job of the DAG finished, and the SLURM jobs (.ci/slurm/verify.py):
#     completed, GPU_RULES below asked for a GPU and saw CUDA_VISIBLE_DEVICES, the profile's
#     slurm-array-jobs rules ran as array tasks, all ran offline
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

# Always under `timeout -s INT`: SIGTERM does not stop a Snakemake that waits on SLURM;
# SIGINT does (and cancels its jobs). HF_HUB_OFFLINE stays unset here: jobs must get it from
# the profile's precommand (verify.py checks), and this config's local rules (splits,
# scoring, metrics, tables, figures) never reach for the hub.
# The --config values repeat the file's: each SLURM job gets them again and must read the
# list and map as numbers, as the submitting Snakemake does, or it fails validation.
# The rules ask for a GPU only for a hub model; the tiny model's jobs of these rules are given
# one here, so that the cluster's (fake) GPUs are placed and seen.
GPU_RULES=(finetune evaluate evaluate_base evaluate_fewshot cloze)
SNAKEMAKE=(env -u HF_HUB_OFFLINE -u HF_DATASETS_OFFLINE -u TRANSFORMERS_OFFLINE "$PYTHON" -m snakemake
    --snakefile "$REPO/Snakefile" --profile "$PROFILE" --configfile "$REPO/config/ci-slurm.yaml"
    --config "seeds=[0]" "evaluate={fewshot: 1}" --set-resources "${GPU_RULES[@]/%/:gpu=1}"
    --slurm-keep-successful-logs --slurm-init-seconds-before-status-checks 2 --retries 0)

# Snakemake runs in the background so that a signal to this script acts at once: the EXIT
# trap interrupts Snakemake (which cancels its jobs), then stops the cluster.
snakemake_pid=""
start_snakemake() { # time limit, log file, snakemake arguments
    local limit=$1 log=$2
    shift 2
    timeout -s INT -k 30 "$limit" "${SNAKEMAKE[@]}" "$@" >"$log" 2>&1 &
    snakemake_pid=$!
}
finish_snakemake() {
    local status=0
    wait "$snakemake_pid" || status=$?
    snakemake_pid=""
    return "$status"
}
cleanup() {
    if [[ -n $snakemake_pid ]]; then
        kill -INT "$snakemake_pid" 2>/dev/null || true
        wait "$snakemake_pid" 2>/dev/null || true
    fi
    bash "$CLUSTER" stop
}
trap cleanup EXIT
# A signal becomes an exit, so the EXIT trap stops the cluster then too.
trap 'exit 130' INT TERM

bash "$CLUSTER" install
# A fresh cluster, whatever an earlier, killed check left running.
bash "$CLUSTER" stop
bash "$CLUSTER" start

rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"

say "workflow on SLURM (log: $ROOT/run.log)"
start_snakemake 420 "$ROOT/run.log" all
if ! finish_snakemake; then
    tail -n 60 "$ROOT/run.log" >&2
    say "FAILED: the workflow run on SLURM (log: $ROOT/run.log)"
    exit 1
fi
say "workflow done after $((SECONDS - START)) s"

# Snakemake counts the DAG's jobs: 100% means every one of them finished.
if ! grep -q "steps (100%) done" "$ROOT/run.log"; then
    say "FAILED: not every job of the DAG finished ($ROOT/run.log)"
    exit 1
fi
"$PYTHON" "$REPO/.ci/slurm/verify.py" "$WORK" "$PROFILE" "${GPU_RULES[@]}"

say "preemption: requeue a finetune job after its first checkpoint"
cp "$RUN/metrics.tsv" "$ROOT/metrics.uninterrupted.tsv"
# --rerun-triggers mtime: only the forced finetune and its evaluation run again, whatever
# else Snakemake would find changed (on a dev machine, someone's edit to a rule's params).
start_snakemake 300 "$ROOT/requeue.log" --rerun-triggers mtime --forcerun finetune -- "$RUN/metrics.tsv"
for _ in $(seq 1500); do
    compgen -G "$RUN/checkpoints/step-*/state.json" >/dev/null && break
    kill -0 "$snakemake_pid" 2>/dev/null || break
    sleep 0.2
done
jobid=$(squeue -h -o "%i %k" | awk '$2 ~ /^rule_finetune_/ {print $1; exit}')
if [[ -z $jobid ]] || ! compgen -G "$RUN/checkpoints/step-*/state.json" >/dev/null; then
    finish_snakemake || true
    tail -n 40 "$ROOT/requeue.log" >&2
    say "FAILED: no running finetune job with a checkpoint to requeue (raise finetune.max_steps?)"
    exit 1
fi
scontrol requeue "$jobid"
# A requeued job may start only after a delay (about 2 min); a preempted job on a busy
# cluster waits for its resources anyway, so the check skips the delay once the job is
# back in the queue (until then the requeue would set the delay again).
for _ in $(seq 300); do
    [[ $(squeue -h -j "$jobid" -o %T) == PENDING ]] && break
    sleep 0.2
done
# The node revokes the first run's credential as that run ends, to the second: a restart
# within the same second is refused ("Job credential revoked") and the job fails (seen in
# CI, 2026-11-29). So the restart waits until the first run's processes are gone and the
# clock has moved on.
for _ in $(seq 300); do
    pgrep -f "slurmstepd: \[$jobid\." >/dev/null || break
    sleep 0.2
done
sleep 2
scontrol update jobid="$jobid" StartTime=now
if ! finish_snakemake; then
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
