#!/usr/bin/env bash
# A real two-node SLURM 22.05 cluster on this one machine, for tests and CI.
#
#   bash scripts/slurm_cluster.sh up      install (apt) if missing, configure, start, wait idle
#   bash scripts/slurm_cluster.sh down    cancel jobs, stop the daemons, delete their state
#   bash scripts/slurm_cluster.sh status  show daemons and `sinfo`
#
# Runs as root without systemd (CI containers). `up` is idempotent: run it as often as you
# like; it only starts what is not running. Both "nodes" (node1, node2) are slurmd processes
# on 127.0.0.1 with different ports. Each node advertises 4 CPUs and 2 *fake* GPUs (gres
# backed by /dev/null-like files), so the sbatch scripts' `--gpus-per-node` lines and
# SLURM_GPUS_ON_NODE work exactly as on a GPU cluster while training runs on CPU with gloo.
#
# Tests read the partition from PIPELINE_SLURM_PARTITION (default: debug, printed by `up`).
# SLURM_CLUSTER_UP_TIMEOUT (seconds, default 60) bounds how long `up` waits for the nodes.
# Config: /etc/slurm; logs: /var/log/slurm-local; state: /var/spool/slurm-local.
set -euo pipefail

PARTITION=${PIPELINE_SLURM_PARTITION:-debug}
NODES=(node1 node2)
NODE_PORTS=(17001 17002)
CPUS_PER_NODE=4
GPUS_PER_NODE=2
CTLD_PORT=16817

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-local # controller state + per-node spool dirs
LOGS=/var/log/slurm-local
PIDS=/run/slurm-local
MARK="# Written by scripts/slurm_cluster.sh"
UP_TIMEOUT=${SLURM_CLUSTER_UP_TIMEOUT:-60}

say() { echo "[slurm_cluster] $*"; }
die() {
    echo "[slurm_cluster] ERROR: $*" >&2
    exit 1
}

# A pid file names a live process of the expected program (pids get reused after `down`).
alive() { # alive PIDFILE PROGRAM
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$2"* ]]
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not try to start services: there is no init system here.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    # Only refresh the package lists when apt cannot find the packages as they are.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/slurm_cluster_apt.log 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update -q >>/tmp/slurm_cluster_apt.log 2>&1
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/slurm_cluster_apt.log 2>&1 ||
            {
                ((made_policy)) && rm -f "$policy"
                die "apt-get install ${missing[*]} failed; see /tmp/slurm_cluster_apt.log"
            }
    fi
    ((made_policy)) && rm -f "$policy"
    return 0
}

ensure_hosts() {
    local n
    for n in "${NODES[@]}"; do
        grep -qE "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || {
            say "adding $n to /etc/hosts"
            echo "127.0.0.1 $n" >>/etc/hosts
        }
    done
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    say "starting munged (as user munge)"
    runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start; see /var/log/munge/munged.log"
}

write_if_changed() { # write_if_changed FILE CONTENT
    if [[ ! -e $1 ]] || [[ $(<"$1") != "$2" ]]; then
        say "writing $1"
        echo "$2" >"$1"
        CONFIG_CHANGED=1 # running daemons would keep the old config
    fi
}

write_config() {
    local host i new
    host=$(hostname -s)
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    mkdir -p "$CONF_DIR"
    # slurmctld only starts where SlurmctldHost is this machine's short hostname.
    new=$(
        cat <<EOF
$MARK; rerun it instead of editing.
ClusterName=pipeline-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
# No cgroups in containers: track processes by parent pid and do no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
MpiDefault=none
# Both "nodes" claim CPUs that the machine shares; trust the config, not the hardware.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol show job long enough for tests to read them.
MinJobAge=1800
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
EOF
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS_PER_NODE RealMemory=1000 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
        done
        echo "PartitionName=$PARTITION Nodes=$(
            IFS=,
            echo "${NODES[*]}"
        ) Default=YES MaxTime=INFINITE State=UP"
    )
    write_if_changed "$CONF" "$new"
    # Fake GPUs: slurmd drops GPUs without device files, so give it /dev/null-like nodes in
    # our own state dir (never in /dev, where CUDA tools would find them). With task/none
    # nothing is bound to them; SLURM only counts and allocates them.
    mkdir -p "$STATE/ctld" "$STATE/fake-gpu" "$LOGS" "$PIDS"
    for ((i = 0; i < GPUS_PER_NODE; i++)); do
        [[ -e $STATE/fake-gpu/gpu$i ]] || mknod "$STATE/fake-gpu/gpu$i" c 1 3 2>/dev/null ||
            touch "$STATE/fake-gpu/gpu$i" # no CAP_MKNOD: slurmd logs an error but still counts it
    done
    write_if_changed "$CONF_DIR/gres.conf" "$(printf '%s\nAutoDetect=off\nName=gpu File=%s/fake-gpu/gpu[0-%d]' \
        "$MARK" "$STATE" $((GPUS_PER_NODE - 1)))"
    for i in "${NODES[@]}"; do mkdir -p "$STATE/d-$i"; done
}

stop_daemons() {
    local f pid
    for f in "$PIDS"/slurmd-*.pid "$PIDS"/slurmctld.pid; do
        [[ -e $f ]] || continue
        pid=$(<"$f")
        if alive "$f" slurm; then
            say "stopping $(basename "$f" .pid) (pid $pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

start_daemons() {
    local n
    if ((${CONFIG_CHANGED:-0})); then
        stop_daemons
    fi
    if ! alive "$PIDS/slurmctld.pid" slurmctld; then
        say "starting slurmctld"
        slurmctld </dev/null >>"$LOGS/daemons.out" 2>&1 || die "slurmctld failed to start; see $LOGS/slurmctld.log"
    fi
    for n in "${NODES[@]}"; do
        if ! alive "$PIDS/slurmd-$n.pid" slurmd; then
            say "starting slurmd -N $n"
            slurmd -N "$n" </dev/null >>"$LOGS/daemons.out" 2>&1 || die "slurmd -N $n failed to start; see $LOGS/slurmd-$n.log"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT)) states resumed=0
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null | sort -u || true)
        # Busy nodes are healthy too: `up` may run again while others' jobs are running.
        if [[ $(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states") -eq ${#NODES[@]} ]]; then
            say "cluster up: partition '$PARTITION', nodes ${NODES[*]} ready ($CPUS_PER_NODE CPUs, $GPUS_PER_NODE fake GPUs each)"
            return 0
        fi
        # A node left down/drained by an earlier run does not come back by itself.
        if ((!resumed)) && grep -qE ' (down|drain|drng|drained)\*?$' <<<"$states"; then
            scontrol update NodeName="$(
                IFS=,
                echo "${NODES[*]}"
            )" State=RESUME 2>/dev/null || true
            resumed=1
        fi
        sleep 0.5
    done
    echo "$states" >&2
    die "nodes not idle after ${UP_TIMEOUT}s; see $LOGS/slurmctld.log and $LOGS/slurmd-*.log"
}

cmd_up() {
    [[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts daemons)"
    install_packages
    ensure_hosts
    start_munge
    write_config
    start_daemons
    wait_idle
}

cancel_jobs() {
    local ids
    ids=$(squeue -h -o %i 2>/dev/null) || return 0 # controller not running
    [[ -n $ids ]] || return 0
    say "cancelling jobs: $(echo $ids)"
    # Let slurmd end the jobs' processes before it goes away, so none are orphaned.
    scancel $ids 2>/dev/null || true
    for _ in $(seq 40); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.5
    done
    say "jobs still listed after 20 s; stopping anyway"
}

cmd_down() {
    [[ $EUID -eq 0 ]] || die "run as root"
    cancel_jobs
    stop_daemons
    say "deleting state in $STATE and logs in $LOGS"
    rm -rf "$STATE" "$LOGS" "$PIDS"
    # munged stays up: it is harmless, shared with anything else on the machine, and fast.
}

cmd_status() {
    local f
    for f in "$PIDS/slurmctld.pid" "$PIDS"/slurmd-*.pid; do
        if alive "$f" slurm; then echo "$(basename "$f" .pid): running (pid $(<"$f"))"; else echo "$(basename "$f" .pid): stopped"; fi
    done
    command -v sinfo >/dev/null && sinfo 2>&1 || echo "sinfo: not installed"
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
