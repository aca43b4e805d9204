#!/usr/bin/env bash
# The GPU checks of this project, as one script for a lent GPU machine (its python3 has torch
# and torchvision, not our pins; pycocotools/faster-coco-eval/submitit come as wheels in .whl).
#   OUT=/path/for/results bash tools/bench/h100_checks.sh              # the performance checks, < 10 min
#   CHECKS=earlier OUT=... bash tools/bench/h100_checks.sh             # loader/detector/NCCL checks, < 10 min
# Writes JSON (the names of results/benchmarks/, tagged with the GPU: step_bench_h200_fast.json, ...)
# and checks.log under $OUT (default results/benchmarks). Every step has its own timeout, and a
# step that would end past the whole run's budget (CHECKS_BUDGET_S, default 570 s) is cut to what
# is left, or skipped under 60 s, so one failure or a slow step does not take the rest.
#
# CHECKS=perf (default), docs/performance.md:
#   1. step_bench, paper size, batch 64, AMP, moco_v2/soco/insloc/pixpro: plain and fast path
#      (channels-last, fused optimizer), each with its kernel-family profile
#   2. feed_bench, batch 64, AMP, fast path, 4 workers: loaders cpu, device, dali (dali only where
#      nvidia.dali imports: its wheel is too large to travel to a lent machine) for moco_v2
#   3. the same for soco (random proposals: no selective-search cache)
#   4. step_bench --fast --compile --profile for the same four methods (last: the longest)
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-results/benchmarks}
CHECKS=${CHECKS:-perf}
DEADLINE=$(( SECONDS + ${CHECKS_BUDGET_S:-570} ))
mkdir -p "$OUT"
if [ -d .whl ]; then
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
LOG="$OUT/checks.log"   # every step's output in one file (few files come back from a lent machine)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
GPU=${GPU_TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -oE '[A-Z]+[0-9]+' \
  | head -n 1 | tr 'A-Z' 'a-z')}
GPU=${GPU:-gpu}
timeout 60 python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$LOG"
run() {   # run NAME TIMEOUT_S COMMAND...
  local name=$1 t=$2; shift 2
  local left=$(( DEADLINE - SECONDS ))
  if [ "$left" -lt 60 ]; then echo "== $name: skipped (${left} s of the budget left)" | tee -a "$LOG"; return; fi
  if [ "$t" -gt "$left" ]; then t=$left; fi
  echo "== $name (timeout ${t} s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" > "/tmp/$name.log" 2>&1; local rc=$?
  grep -v "it/s\]\|img/s\]" "/tmp/$name.log" | tail -n 40 >> "$LOG"; echo "rc=$rc after $(( SECONDS - t0 )) s" | tee -a "$LOG"
  tail -n 8 "/tmp/$name.log"
}
STEP=(python3 -m tools.bench.step_bench --scale paper --batch 64 --image-size 448 --steps 10 --device cuda --amp
      --methods moco_v2,soco,insloc,pixpro)
FEED=(python3 -m tools.bench.feed_bench --scale paper --device cuda --amp --fast --batch 64 --workers 4 --steps 20
      --images 768)
case "$CHECKS" in
perf)
  if timeout 60 python3 -c "import nvidia.dali" 2>/dev/null; then LOADERS=cpu,device,dali
  else LOADERS=cpu,device; echo "nvidia.dali is not importable here: loader dali not measured" | tee -a "$LOG"; fi
  run step_bench 120 "${STEP[@]}" --fast --profile --out "$OUT/step_bench_${GPU}_fast.json"
  run feed_bench_moco_v2 100 "${FEED[@]}" --method moco_v2 --loaders "$LOADERS" \
    --out "$OUT/feed_bench_${GPU}.json"
  run feed_bench_soco 100 "${FEED[@]}" --method soco --random-proposals --loaders "$LOADERS" \
    --out "$OUT/feed_bench_soco_${GPU}.json"
  run step_bench_compile 300 "${STEP[@]}" --fast --compile --profile \
    --out "$OUT/step_bench_compile_${GPU}.json"
  ;;
earlier)
  # the loader's device half (GPU decode + batched photometric) per method
  run loader_bench 90 python3 -m tools.bench.loader_bench --device cuda --samples 64 \
    --out "$OUT/loader_bench_${GPU}.json"
  # each detector's fine-tuning step at paper size
  run detector_bench 150 python3 -m tools.bench.detector_bench --scale paper --batch 8 --steps 5 \
    --device cuda --amp --out "$OUT/detector_bench_${GPU}.json"
  # one stage through the distributed code path on the GPU: torchrun, one process, NCCL
  export DETBENCH_RUNS=/tmp/dist/runs DETBENCH_CACHE=/tmp/dist/cache DETBENCH_RESULTS=/tmp/dist/results
  run nccl_pretrain 120 python3 -m torch.distributed.run --nproc_per_node 1 -m benchmark.cli pretrain \
    --method moco_v2 --scale micro
  timeout 30 python3 - <<'PY' | tee -a "$LOG"
import glob, json
for p in glob.glob("/tmp/dist/runs/*/env.json"):
    env = json.load(open(p)); m = json.load(open(p.replace("env.json", "metrics.json")))
    print(p.split("/")[-2], env["distributed"], env["hardware"]["gpus"], "replicas_in_sync", m.get("replicas_in_sync"))
PY
  ;;
*) echo "CHECKS: expected perf or earlier, got $CHECKS" >&2; exit 2 ;;
esac
echo "total $SECONDS s" | tee -a "$LOG"
