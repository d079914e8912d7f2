#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for NeuroLens's tests and CI (run as root).
#
#   deploy/slurm/cluster.sh install   Debian's slurmctld, slurmd, slurm-client, munge if missing
#   deploy/slurm/cluster.sh start     write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd;
#                                     return once the node takes jobs
#   deploy/slurm/cluster.sh stop      stop the daemons this script started
#   deploy/slurm/cluster.sh status    exit 0 when a cluster answers
#
# State (spool, logs, pid files) lives in $NEUROLENS_SLURM_STATE (default /var/tmp/neurolens-slurm).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${NEUROLENS_SLURM_STATE:-/var/tmp/neurolens-slurm}"
CONF=/etc/slurm/slurm.conf

need_root() {
    if [ "$(id -u)" != 0 ]; then echo "cluster.sh $1 needs root" >&2; exit 2; fi
}

answering() {
    # The node is up when slurmctld answers and the node is idle, mixed or allocated.
    sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'
}

case "${1:-}" in
install)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then exit 0; fi
    need_root install
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    ;;
start)
    need_root start
    if answering; then echo "a Slurm cluster already answers; using it"; exit 0; fi
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm /run/munge /var/log/munge /var/lib/munge
    # `slurmd -C` reports the CPUs and memory this node really has; a few MB less memory than it
    # says, so that a kernel's rounding never drains the node as "low RealMemory".
    read -r cpus memory < <(slurmd -C | awk '/^NodeName/ {for (i = 1; i <= NF; i++) {split($i, kv, "=");
        if (kv[1] == "CPUs") c = kv[2]; if (kv[1] == "RealMemory") m = kv[2]}} END {print c, m - 64}')
    host="$(hostname -s)"
    sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY@|$memory|g" -e "s|@STATE@|$STATE|g" \
        "$HERE/slurm.conf.in" > "$CONF"
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- munged --pid-file=/run/munge/munged.pid
        echo started > "$STATE/munged.ours"
    fi
    # -c: a clean start, no jobs left over from an earlier run of the cluster.
    slurmctld -c
    slurmd
    for _ in $(seq 1 60); do
        if answering; then echo "Slurm cluster up: node $host, $cpus CPUs, ${memory} MB"; exit 0; fi
        # A node that was down last time comes back only when told to.
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "Slurm did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
    exit 1
    ;;
stop)
    for name in slurmd slurmctld; do
        if [ -s "$STATE/$name.pid" ]; then kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true; fi
    done
    if [ -f "$STATE/munged.ours" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/munged.ours"
    fi
    ;;
status)
    answering
    ;;
*)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
