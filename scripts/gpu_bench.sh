#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, from the repo root of a GPU host (4 GPUs for ISP and max length;
# stages needing more GPUs than present run on what there is). Results: $RESULTS (default docs/bench).
#   bash scripts/gpu_bench.sh max_length   # 7B max-length bisection (deadline $DEADLINE s, default 540)
#   bash scripts/gpu_bench.sh suite        # kernel checks, attention, MFU, profiles, ISP vs CP, LLaVA/Flux runs
# Each stage has its own timeout ($STAGE_TIMEOUT s); a failed stage is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-docs/bench}
mkdir -p "$RESULTS"
# NVLink multicast stays off (a program using it can take a shared host's GPUs down)
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
TORCHRUN=(python3 -m torch.distributed.run --standalone)
stage() { echo "== $(date +%T) $*"; timeout "${STAGE_TIMEOUT:-300}" "$@" || echo "!! stage failed (exit $?): $*"; }

case "${1:-}" in
  max_length)
    stage python3 scripts/bench_max_length.py --out "$RESULTS/max_length.json" --nproc "$NGPU" \
      --deadline "${DEADLINE:-540}" ${MAX_LENGTH_ARGS:-} ;;
  suite)
    stage env OUT="$RESULTS/gpu_check" bash scripts/gpu_check.sh
    stage python3 scripts/bench_attention.py --out "$RESULTS/attention.json"
    stage python3 scripts/bench_packing.py --out "$RESULTS/mfu.json" --tokens-per-step 8192 \
      --contenders hfpatch,hfpatch_compiled
    stage "${TORCHRUN[@]}" --nproc-per-node 1 scripts/profile_step.py --out "$RESULTS/profile_sp1.json"
    stage "${TORCHRUN[@]}" --nproc-per-node "$NGPU" scripts/profile_step.py --out "$RESULTS/profile_sp$NGPU.json"
    stage "${TORCHRUN[@]}" --nproc-per-node "$NGPU" scripts/bench_isp.py --out "$RESULTS/isp.json"
    SP=$(( NGPU >= 2 ? 2 : 1 ))
    for model in llava flux; do
      stage python3 -m hfpatch.cli train "$model" --nproc "$SP" --sp "$SP" --steps 40 --out "$RESULTS/train_$model"
    done ;;
  *) echo "usage: $0 max_length|suite" >&2; exit 2 ;;
esac
