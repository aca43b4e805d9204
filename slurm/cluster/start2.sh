#!/usr/bin/env bash
# detbench: start the two-node test cluster: start.sh with NODES=2 and its own state directory,
# ports, accounting cluster name and network, so that it runs beside the single-node cluster
# of start.sh (whose SLURM_BASE/ports settings it ignores: it has its own, below).
#
# Nodes n1 (10.231.0.11) and n2 (10.231.0.12), each a slurmd in its own network + UTS
# namespace (detbench-n1, detbench-n2) behind a veth on the bridge detbench-br, which carries
# 10.231.0.1, slurmctld's address (root namespace); see nodes.sh.
#
# Settings (environment): SLURM2_BASE=/tmp/detbench-slurm2, SLURM2_NODES=2,
#   SLURM2_PORTS="6927 6928 6929 3327" (slurmctld, slurmd, slurmdbd, MariaDB),
#   NET=10.231.0, NETNS_PREFIX=detbench, MAX_ARRAY_SIZE, NODE_CPUS, NODE_MEM_MB, RESET (as start.sh)
# Afterwards:  source "${SLURM2_BASE:-/tmp/detbench-slurm2}/env.sh"
# Stop:        slurm/cluster/stop2.sh
set -euo pipefail
read -r CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT <<< "${SLURM2_PORTS:-6927 6928 6929 3327}"
export CTLD_PORT SLURMD_PORT DBD_PORT DB_PORT
export SLURM_BASE=${SLURM2_BASE:-/tmp/detbench-slurm2} NODES=${SLURM2_NODES:-2} CLUSTER_NAME=detbench2
exec "$(dirname "${BASH_SOURCE[0]}")/start.sh" "$@"
