#!/usr/bin/env bash
# detbench: stop the cluster started by slurm/cluster/start.sh, by its PID files only; for a
# multi-node cluster (NODES > 1) also remove the network namespaces, veths and bridge that
# start.sh created (listed in $SLURM_BASE/nodes.env).
# Succeeds when nothing is running.  PURGE=1 also removes $SLURM_BASE (all state and logs).
set -uo pipefail

BASE=${SLURM_BASE:-/tmp/detbench-slurm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=nodes.sh
. "$HERE/nodes.sh"
export SLURM_CONF=$BASE/etc/slurm.conf
say() { printf '[detbench-slurm stop] %s\n' "$*"; }

# stop_by_pidfile <pidfile> <name>: SIGTERM, wait up to 20 s, then SIGKILL
stop_by_pidfile() {
  local file=$1 name=$2 pid
  if [ ! -s "$file" ]; then say "$name: not started"; return 0; fi
  pid=$(cat "$file")
  if ! kill -0 "$pid" 2>/dev/null; then say "$name: not running"; rm -f "$file"; return 0; fi
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; say "$name ($pid): killed"
  else say "$name ($pid): stopped"; fi
  rm -f "$file"
}

# cancel leftover jobs first, so no job processes outlive slurmd
if [ -s "$BASE/run/slurmctld.pid" ] && kill -0 "$(cat "$BASE/run/slurmctld.pid")" 2>/dev/null; then
  ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${ids// /}" ]; then
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.25; done
    say "cancelled jobs: $ids"
  fi
fi

stop_by_pidfile "$BASE/run/slurmctld.pid" slurmctld &
slurmds=$(ls "$BASE"/run/slurmd.pid "$BASE"/run/slurmd.*.pid 2>/dev/null)   # slurmd.n<i>.pid: one per node
for pidfile in ${slurmds:-$BASE/run/slurmd.pid}; do
  stop_by_pidfile "$pidfile" "$(basename "$pidfile" .pid)" &
done
wait
nodes_down "$BASE" | sed 's/^/[detbench-slurm stop] /'
stop_by_pidfile "$BASE/run/slurmdbd.pid" slurmdbd
stop_by_pidfile "$BASE/db/run/mysqld.pid" mariadbd &
stop_by_pidfile "$BASE/munge/run/munged.pid" munged &
wait

if [ "${PURGE:-0}" = 1 ]; then rm -rf "$BASE"; say "purged $BASE"; fi
exit 0
