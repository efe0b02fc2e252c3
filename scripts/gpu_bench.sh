#!/usr/bin/env bash
# The GPU numbers of docs/benchmarks.md, from the repo root of a GPU host (4 GPUs for ISP and max length;
# stages needing more GPUs than present run on what there is). Results: $RESULTS (default docs/bench).
#   bash scripts/gpu_bench.sh max_length   # 7B max-length bisection (deadline $DEADLINE s, default 540)
#   bash scripts/gpu_bench.sh suite        # kernel checks, attention, MFU, profiles, ISP vs CP, LLaVA/Flux runs
#   bash scripts/gpu_bench.sh rows         # every zoo row: numerics, training (short documents), Mamba's scan, 2 GPUs ($RESULTS/rows,
#                                          # $RESULTS/rows/gpu_rows.md; ~5 min, bounded by $ROWS_DEADLINE s, default 320)
#   bash scripts/gpu_bench.sh levers       # one GPU: peak memory and step time of the packing model at long rows,
#                                          # memory levers off / --long-context (LEVER_TOKENS, default 65536 131072)
#   bash scripts/gpu_bench.sh fast         # one GPU: env, checks, attention, the fused loss and its chunk kernel alone,
#                                          # packing vs the liger peer, trainer vs bare
#   bash scripts/gpu_bench.sh packing      # one GPU: the packing contenders, profiled, GPU clocks logged
#   bash scripts/gpu_bench.sh trainer_vs_bare  # one GPU: `hfpatch train` against the bare fwd+bwd, same model and packs
#   bash scripts/gpu_bench.sh padded_pair  # one GPU: padded llama2 vs internlm1 training steps, profiled
# Each stage has its own timeout ($STAGE_TIMEOUT s); a failed stage is reported and the next one runs.
# RESULTS_TAR=FILE.tgz: everything under $RESULTS (checkpoints excluded) also as one archive at the end.
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
# the packing benchmark's model as `hfpatch train` settings
ARCH=(--set model.hidden_size=2048 --set model.intermediate_size=5632 --set model.num_hidden_layers=16
      --set model.num_attention_heads=16 --set model.num_key_value_heads=16 --set model.vocab_size=32000)
# the embedded corpus as a jsonl file outside $RESULTS (large): each topic whole, or cut into documents of N paragraphs;
# REPEAT copies. Long: `corpus_docs 0 12` (many full 16K rows). Short: `corpus_docs 6 4` (median 308 tokens: packing's case)
corpus_docs() {
  local docs; docs=$(mktemp -d)/docs.jsonl
  python3 -c 'import json, re, sys, pydoc_data.topics as t
size, repeat = int(sys.argv[2]), int(sys.argv[3])
def cut(text):
    if not size:
        return [text]
    ps = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return ["\n\n".join(ps[i:i + size]) for i in range(0, len(ps), size)]
docs = [doc for text in t.topics.values() for doc in cut(text)] * repeat
open(sys.argv[1], "w").writelines(json.dumps({"text": d}) + "\n" for d in docs)' "$docs" "$1" "$2"
  echo "$docs"
}

# the step's matmuls alone (the floor), the peer and hfpatch's default, profiled and what is live at each one's memory
# peak, with the card's SM clock and power draw logged beside them (a GEMM-bound step runs at a lower clock under the
# power limit); PACKING_CONTENDERS to change. ~4.5 min on a fresh machine, most of it the peer's setup and compile
# (3-4 min; once it had not reached its timed window after 290 s): give the call the stage's whole 420 s.
packing() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 500 > "$RESULTS/gpu_clocks.csv" &
  local clocks=$!
  STAGE_TIMEOUT=420 stage python3 scripts/bench_packing.py --out "$RESULTS/packing.json" --profile 2 --memory-peak \
    --contenders "${PACKING_CONTENDERS:-gemm_only,hf_padfree_liger,hfpatch}"
  kill "$clocks"
}

# the trainer itself on the packing model and full 16K-token packs (no epoch-end remainder in the timed steps): as it
# runs by default (one GPU: a bf16 weight copy), and with FSDP2 instead (--no-weight-copy); a short profiled run;
# then the bare fwd+bwd of the same documents. The first 5 steps (compile) untimed.
trainer_vs_bare() {
  local docs; docs=$(corpus_docs 0 12)
  local train=(llama2 --data "$docs" --overflow split --seq-len 16384 --micro-num 1 --set log_every=1
               --set save_checkpoints=false "${ARCH[@]}")
  stage python3 -m hfpatch.cli train "${train[@]}" --steps 30 --out "$RESULTS/train_copy"
  stage python3 -m hfpatch.cli train "${train[@]}" --steps 30 --no-weight-copy --out "$RESULTS/train_fsdp2"
  stage python3 scripts/profile_trainer.py --out "$RESULTS/trainer_profile.json" --profile-steps 8 9 -- \
    "${train[@]}" --steps 9 --out "$RESULTS/train_profiled"
  stage python3 scripts/bench_packing.py --source trainer --data "$docs" --tokens-per-step 16384 --steps 25 --warmup 5 \
    --contenders hfpatch --profile 2 --trainer-run "$RESULTS/train_copy" "$RESULTS/train_fsdp2" \
    --out "$RESULTS/trainer_vs_bare.json"
}

# the padded training steps of llama2 and internlm1 (same class and sizes as in `rows`, differing only in q/k/v
# biases), profiled, on the same short documents, in alternating order (it found cuDNN SDPA building a plan per
# padded shape, now turned off)
padded_pair() {
  local docs; docs=$(corpus_docs 6 4)
  local size=(--set model.hidden_size=512 --set model.num_attention_heads=4 --set model.num_key_value_heads=4
              --set model.intermediate_size=1376 --set model.num_hidden_layers=4)
  local i=0 row
  for row in llama2 internlm1 llama2 internlm1; do
    i=$((i + 1))
    stage python3 scripts/profile_trainer.py --out "$RESULTS/padded_${i}_$row.json" --profile-steps 10 11 -- \
      "$row" --padded --no-compile --data "$docs" --overflow split --seq-len 2048 --micro-num 4 --steps 14 --seed 0 \
      --set log_every=1 --set save_checkpoints=false "${size[@]}" --out "$RESULTS/padded_${i}_$row"
  done
}

case "${1:-}" in
  max_length)
    stage python3 scripts/bench_max_length.py --out "$RESULTS/max_length.json" --nproc "$NGPU" \
      --deadline "${DEADLINE:-540}" ${MAX_LENGTH_ARGS:-} ;;
  suite)
    stage env OUT="$RESULTS/gpu_check" bash scripts/gpu_check.sh
    stage python3 scripts/bench_attention.py --out "$RESULTS/attention.json"
    stage python3 scripts/bench_packing.py --out "$RESULTS/mfu.json" --tokens-per-step 8192 \
      --contenders hfpatch_eager,hfpatch
    stage "${TORCHRUN[@]}" --nproc-per-node 1 scripts/profile_step.py --out "$RESULTS/profile_sp1.json"
    stage "${TORCHRUN[@]}" --nproc-per-node "$NGPU" scripts/profile_step.py --out "$RESULTS/profile_sp$NGPU.json"
    stage "${TORCHRUN[@]}" --nproc-per-node "$NGPU" scripts/bench_isp.py --out "$RESULTS/isp.json"
    SP=$(( NGPU >= 2 ? 2 : 1 ))
    for model in llava flux; do
      stage python3 -m hfpatch.cli train "$model" --nproc "$SP" --sp "$SP" --steps 40 --out "$RESULTS/train_$model"
    done ;;
  fast)  # ~10 min: on a runner with a 10-minute cap, run `packing` and `trainer_vs_bare` as two calls instead
    python3 -m hfpatch.cli env > "$RESULTS/env.txt" 2>&1; cat "$RESULTS/env.txt"
    stage python3 scripts/gpu_check.py --out "$RESULTS/gpu_check_1gpu.json"
    stage python3 scripts/bench_attention.py --out "$RESULTS/attention.json"
    stage python3 scripts/bench_fused_loss.py --out "$RESULTS/fused_loss.json"
    stage python3 scripts/bench_loss_chunk.py --out "$RESULTS/loss_chunk.json"
    packing
    trainer_vs_bare ;;
  packing) packing ;;
  trainer_vs_bare) trainer_vs_bare ;;
  padded_pair) padded_pair ;;
  rows)
    STAGE_TIMEOUT=$(( ${ROWS_DEADLINE:-320} + 60 )) stage python3 scripts/gpu_rows.py --out "$RESULTS/rows" --two-gpus \
      --data "$(corpus_docs 6 4)" --deadline "${ROWS_DEADLINE:-320}" ${ROWS_ARGS:-}
    stage python3 scripts/gpu_rows_report.py "$RESULTS/rows" --out "$RESULTS/rows/gpu_rows.md" ;;
  levers)
    DOCS=$(corpus_docs 0 12)
    for tokens in ${LEVER_TOKENS:-65536 131072}; do
      for levers in plain long-context; do
        flags=(); [ "$levers" = long-context ] && flags=(--long-context)
        stage python3 -m hfpatch.cli train llama2 --data "$DOCS" --seq-len "$tokens" --micro-num 1 \
          --overflow split --steps 3 --set log_every=1 --set save_checkpoints=false --no-compile "${flags[@]}" "${ARCH[@]}" \
          --out "$RESULTS/levers_${levers}_$tokens"
      done
    done ;;
  *) echo "usage: $0 max_length|suite|fast|packing|trainer_vs_bare|padded_pair|rows|levers" >&2; exit 2 ;;
esac
# one archive of the results, for a runner that brings back only a few files (RESULTS_TAR=path.tgz)
if [ -n "${RESULTS_TAR:-}" ]; then
  tar czf "$RESULTS_TAR" --exclude=checkpoints -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "results in $RESULTS_TAR"
fi
