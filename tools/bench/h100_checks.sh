#!/usr/bin/env bash
# The GPU checks of this project, as one script for a lent GPU machine (its python3 has torch
# and torchvision, not our pins; pycocotools/faster-coco-eval/submitit come as wheels in .whl).
#   OUT=/path/for/results bash tools/bench/h100_checks.sh
# Writes JSON and logs under $OUT. Each step is bounded so one failure does not take the rest.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
LOG="$OUT/checks.log"   # every step's output in one file (few files come back from a lent machine)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$LOG"
run() {
  local name=$1 t=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$t" "$@" > "/tmp/$name.log" 2>&1; local rc=$?
  grep -v "it/s\]\|img/s\]" "/tmp/$name.log" | tail -n 40 >> "$LOG"; echo "rc=$rc" | tee -a "$LOG"
  tail -n 8 "/tmp/$name.log"
}
# 1. paper-size pretraining step, plain vs fast path (channels-last, fused optimizer), AMP, batch 64
run step_bench 130 python3 -m tools.bench.step_bench --scale paper --batch 64 --image-size 448 --steps 10 \
    --device cuda --amp --fast --methods moco_v2,soco,insloc,pixpro --out "$OUT/step_bench_h100.json"
# 2. the step fed by its real loader (workers decoding 500x375 JPEGs) vs the step alone, loader cpu and device
run feed_bench 110 python3 -m tools.bench.feed_bench --method moco_v2 --device cuda --amp --fast --batch 64 \
    --workers 12 --steps 20 --images 768 --out "$OUT/feed_bench_h100.json"
# 3. the loader's device half (GPU decode + batched photometric) per method
run loader_bench 90 python3 -m tools.bench.loader_bench --device cuda --samples 64 --out "$OUT/loader_bench_h100.json"
# 4. each detector's fine-tuning step at paper size
run detector_bench 120 python3 -m tools.bench.detector_bench --scale paper --batch 8 --steps 5 --device cuda --amp \
    --out "$OUT/detector_bench_h100.json"
# 5. one stage through the distributed code path on the GPU: torchrun, one process, NCCL
export DETBENCH_RUNS=/tmp/dist/runs DETBENCH_CACHE=/tmp/dist/cache DETBENCH_RESULTS=/tmp/dist/results
run nccl_pretrain 90 python3 -m torch.distributed.run --nproc_per_node 1 -m benchmark.cli pretrain --method moco_v2 --scale micro
python3 - <<'PY' | tee -a "$LOG"
import glob, json
for p in glob.glob("/tmp/dist/runs/*/env.json"):
    env = json.load(open(p)); m = json.load(open(p.replace("env.json", "metrics.json")))
    print(p.split("/")[-2], env["distributed"], env["hardware"]["gpus"], "replicas_in_sync", m.get("replicas_in_sync"))
PY
