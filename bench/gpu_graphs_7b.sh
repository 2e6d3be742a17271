#!/usr/bin/env bash
# Issue 15, second round on one lent GPU: the baseline a user would write (shared/bench/baseline_train_7b.py,
# LoRA at B4·T160 and B16·T544) and our trainer as it was (defaults), with CUDA graphs
# (train.cuda_graphs) and with graphs + fused RMSNorm/rotary (train.fused_ops), same card, same call.
#   here:       bash bench/gpu_carry.sh && cp /work/shared/bench/baseline_train_7b.py .carry/
#   on the GPU: bash bench/gpu_graphs_7b.sh          (device kind nvidia-h200, carry .carry)
set -uo pipefail
source bench/gpu_7b_prelude.sh
if [ -z "${TINY:-}" ]; then  # the baseline's LoRA rows only (its own run(), its own matmul rate)
  timeout 50 python3 -c "
import json, sys; sys.path.insert(0, '.carry'); import baseline_train_7b as b
rate = b.matmul_rate(); print(json.dumps({'bf16_matmul_TFLOPs': round(rate / 1e12, 1)}), flush=True)
for B, T, steps in ((4, 128, 10), (16, 512, 8)):
    r = b.run('lora', B, T, steps, False); r['mfu_llm_est'] = round(r['llm_tflops'] * 1e12 / rate, 3)
    print(json.dumps(r), flush=True)" 2>&1 | grep '^{' | tee "$out/baseline.jsonl"
fi
bench() { timeout "$1" python3 bench/train_7b.py speed "$work/base" "$work/$2" "${@:3}" 2>&1 | grep '^{' | tee -a "$out/ours.jsonl"; }
g=train.cuda_graphs=true; f=train.fused_ops=true
bench 70 d128 --case "4" --case "4 $g" --case "4 $g $f"
bench 85 d512 --case "16" --case "16 $g" --case "16 $g $f"
echo "total: $(( $(date +%s) - t0 )) s"
# issue 10: the InstructBLIP recipe's memory again with this code (no KV cache in training), base already here
mkdir -p "$work/mem" && ln -sfn "$work/base" "$work/mem/base_instructblip"
timeout 30 python3 bench/recipe_memory.py "$work/mem" --only instructblip ${TINY:+--tiny} 2>&1 | grep '^{' | tee "$out/memory.jsonl"
echo "total: $(( $(date +%s) - t0 )) s"
