#!/usr/bin/env bash
# GPU checks in one go (run on a GPU machine from the repo root): varlen kernels vs the reference
# in bf16 on one GPU, then ISP sp=2 vs sp=1 over NCCL when two GPUs are present.
# Reports: $OUT (default docs/gpu_check)/gpu_check_1gpu.json and gpu_check_sp2.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0
python3 scripts/gpu_check.py --out "$OUT/gpu_check_1gpu.json"
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/gpu_check.py --out "$OUT/gpu_check_sp2.json"
fi
