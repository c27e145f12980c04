#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for CI: munge, slurmctld and slurmd from
# Debian's packages, two fake GPUs; state, logs, pid files and fake devices under one
# scratch folder. Every subcommand can run twice in a row.
#
#   cluster.sh install   apt-get the daemons (skipped when present)
#   cluster.sh start     write the config, start the daemons, wait until the node is idle
#   cluster.sh stop      cancel our jobs, stop the daemons by their pid files
#
# slurm.conf and gres.conf go to /etc/slurm, the only place every client finds them: the
# plugin's job step drops SLURM_CONF from srun's environment. A slurm.conf there that this
# script did not write is never touched.
#
# See ../shared/notes/slurm-single-node.md for why each setting is there.
set -euo pipefail

ROOT=${FACTFT_SLURM_DIR:-/tmp/factft-slurm}
ETC=/etc/slurm
CONF=$ETC/slurm.conf
MARK="# factft CI cluster: written by .ci/slurm/cluster.sh"
# The daemons' pid files; stop only what these name.
PIDS=("$ROOT/run/slurmd.pid" "$ROOT/run/slurmctld.pid" "$ROOT/munge/munged.pid")

say() { echo "[slurm-ci] $*" >&2; }

alive() { # pid file -> true when the process it names runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        say "slurm and munge already installed"
        return
    fi
    say "installing slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
        say "$CONF exists and is not ours: not a CI machine? leaving it alone"
        return 1
    fi
    mkdir -p "$ETC" "$ROOT"/{etc,dev,state,spool,log,run}
    # A gres with only a count is dropped by slurmd (node INVAL): the GPUs must be files,
    # and character devices at that (mknod of /dev/null's numbers is harmless).
    for i in 0 1; do
        [[ -c $ROOT/dev/nvidia$i ]] || { rm -f "$ROOT/dev/nvidia$i"; mknod "$ROOT/dev/nvidia$i" c 1 3; }
    done
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    # The node is sized like a small GPU node (8 CPUs, 2 GPUs) whatever this machine has,
    # so the site profile's requests (cpus_per_task, mem_mb) schedule unchanged;
    # config_overrides makes slurmd accept the difference. Memory is not a consumable
    # with CR_Core: RealMemory only bounds what one job may ask for.
    cat >"$CONF.new" <<EOF
$MARK
ClusterName=factft-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$ROOT/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
# A requeued job appends to its log instead of truncating it: both runs stay readable.
JobFileAppend=1
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
# Each task's environment as SLURM set it, into the job's log: the CI check reads it.
TaskProlog=$ROOT/etc/taskprolog.sh
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=$((mem_mb > 64000 ? mem_mb : 64000)) Gres=gpu:2 State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/gres.conf.new" <<EOF
$MARK
AutoDetect=off
Name=gpu File=$ROOT/dev/nvidia[0-1]
EOF
    cat >"$ROOT/etc/taskprolog.sh.new" <<'EOF'
#!/bin/sh
# "print" lines of a TaskProlog go to the task's standard output (the job's log).
echo "print slurm-ci: job=$SLURM_JOB_ID step=${SLURM_STEP_ID:-batch} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-}"
EOF
    chmod +x "$ROOT/etc/taskprolog.sh.new"
    local changed=0 f
    for f in "$CONF" "$ETC/gres.conf" "$ROOT/etc/taskprolog.sh"; do
        if cmp -s "$f.new" "$f"; then rm "$f.new"; else mv "$f.new" "$f"; changed=1; fi
    done
    # Running daemons keep the old config until told.
    if ((changed)) && alive "$ROOT/run/slurmctld.pid"; then
        say "config changed: scontrol reconfigure"
        scontrol reconfigure
    fi
}

start_munge() {
    alive "$ROOT/munge/munged.pid" && return
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    mkdir -p "$ROOT/munge"
    chown munge:munge "$ROOT/munge"
    chmod 0755 "$ROOT/munge"
    runuser -u munge -- munged --socket="$ROOT/munge/munge.socket" \
        --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/munge/munged.log" \
        --seed-file="$ROOT/munge/munged.seed"
}

start() {
    write_config
    start_munge
    # -c: start from an empty job list, whatever an earlier run left in the state folder.
    alive "$ROOT/run/slurmctld.pid" || slurmctld -c
    alive "$ROOT/run/slurmd.pid" || slurmd -N localhost
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
        [[ $state == idle || $state == mix || $state == alloc ]] && { say "node localhost: $state"; return; }
        sleep 0.5
    done
    say "node did not come up (state '$state'); logs under $ROOT/log"
    tail -n 20 "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd.log" >&2 || true
    return 1
}

stop() {
    if alive "$ROOT/run/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local pidfile pid
    for pidfile in "${PIDS[@]}"; do
        alive "$pidfile" || { rm -f "$pidfile"; continue; }
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { kill -9 "$pid" 2>/dev/null || true; }
        rm -f "$pidfile"
    done
    say "stopped"
}

case ${1:-} in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
