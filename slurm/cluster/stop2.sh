#!/usr/bin/env bash
# detbench: stop the two-node test cluster of start2.sh and remove the network namespaces, veths
# and bridge it created (stop.sh on ${SLURM2_BASE:-/tmp/detbench-slurm2}; PURGE=1 also removes it).
set -euo pipefail
export SLURM_BASE=${SLURM2_BASE:-/tmp/detbench-slurm2}
exec "$(dirname "${BASH_SOURCE[0]}")/stop.sh" "$@"
