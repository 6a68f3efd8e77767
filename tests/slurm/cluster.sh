#!/usr/bin/env bash
# A single-node Slurm on this machine, for the tests of `ftsgd sweep --slurm` (tests/slurm/).
#
#   tests/slurm/cluster.sh up     install Slurm and munge if missing (Debian: apt-get), start munged,
#                                 slurmctld and slurmd, wait until the node takes jobs
#   tests/slurm/cluster.sh down   stop the daemons this script started
#   tests/slurm/cluster.sh status print whether the cluster answers (exit 0) or not (exit 1)
#
# Needs root (CI runs as root). It writes /etc/slurm/slurm.conf only when that file is missing or was
# written by this script (its first line says so): a machine with its own Slurm is never touched.
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none need no cgroups, so the cluster starts in
# seconds inside a container. The node offers more CPUs than the machine has (config_overrides): the
# test jobs are tiny and should not queue behind each other.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by ftsgd tests/slurm/cluster.sh"
STATE=/var/lib/ftsgd-slurm
LOGS=/var/log/ftsgd-slurm
NODE_CPUS=${FTSGD_SLURM_CPUS:-8}

log() { printf 'cluster.sh: %s\n' "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (it installs packages and starts the Slurm daemons)"
        exit 2
    fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not start (see /var/log/munge/munged.log)"
    exit 1
}

write_conf() {
    if [ -e "$CONF" ] && [ "$(head -n1 "$CONF")" != "$MARK" ]; then
        log "$CONF exists and was not written by this script: this machine has its own Slurm; leaving it"
        return
    fi
    local host mem
    host=$(hostname -s)
    mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF.tmp" <<CONF
$MARK
ClusterName=ftsgd-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
InactiveLimit=0
MaxArraySize=10001
NodeName=$host CPUs=$NODE_CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    mv "$CONF.tmp" "$CONF"
}

answers() {
    timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

up() {
    need_root
    install_packages
    start_munge
    write_conf
    if answers; then
        log "already up"
        return
    fi
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 150); do
        if answers; then
            log "up: $(sinfo -h -o '%P %D node(s) %T %c CPUs')"
            return
        fi
        timeout 10 scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    log "slurm did not come up; logs in $LOGS"
    tail -n 20 "$LOGS"/*.log >&2 || true
    exit 1
}

down() {
    need_root
    if [ -e "$CONF" ] && [ "$(head -n1 "$CONF")" != "$MARK" ]; then
        log "$CONF was not written by this script; not stopping this machine's Slurm"
        return
    fi
    timeout 10 scancel --user=root >/dev/null 2>&1 || true
    for daemon in slurmd slurmctld; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.1
    done
    log "down"
}

case "${1:-}" in
up) up ;;
down) down ;;
status)
    if answers; then echo "up"; else echo "down"; exit 1; fi
    ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
