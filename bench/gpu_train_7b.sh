#!/usr/bin/env bash
# Issue 15 on a lent 2-GPU machine, in one call: the InstructBLIP-Vicuna-7B shape (random weights, saved as an
# HF directory, loaded through model.base) trained by the baseline a user would write
# (shared/bench/baseline_train_7b.py) and by our trainer on GPU 0, then 1 GPU vs 2 GPUs at one global batch and
# a 2-GPU checkpoint resumed on 1 GPU. Results: $OUT/*.jsonl, $OUT/summary.md (bench/train_7b_report.py).
#   here:       bash bench/gpu_carry.sh && cp /work/shared/bench/baseline_train_7b.py .carry/
#   on the GPU: bash bench/gpu_train_7b.sh          (device kind nvidia-h200-x2, carry .carry)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
source bench/gpu_7b_prelude.sh

export CUDA_VISIBLE_DEVICES=0
timeout 130 python3 .carry/baseline_train_7b.py 2>&1 | grep '^{' | tee "$out/baseline.jsonl"
bench() { timeout "$1" python3 bench/train_7b.py speed "$work/base" "$work/$2" "${@:3}" 2>&1 | grep '^{' | tee -a "$out/ours.jsonl"; }
bench 150 d128 --case "4" --case "4 train.precision=bf16-mixed" --case "4 train.gradient_checkpointing=true" \
      --case "4 train.method=full train.precision=bf16-true"
bench 60 d512 --case "16"

# one global batch (16 x 160 tokens) on 1 GPU and on 2; then the 2-GPU run resumed on 1 GPU from its step 20
keys=(train.steps=30 train.batch_size=16 train.lr=1e-3 train.warmup_steps=3 train.checkpoint_every=20)
run=(bench/train_7b.py steps "$work/base" "$work/d128")
launch=(-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no)
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 "${run[@]}" "$work/one" "${keys[@]}" 2>&1 | filter | tail -2
unset CUDA_VISIBLE_DEVICES
timeout 100 python3 "${launch[@]}" "${run[@]}" "$work/two" "${keys[@]}" 2>&1 | filter | tail -2
cp -r "$work/two" "$work/cut"
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 "${run[@]}" "$work/cut" --resume "${keys[@]}" 2>&1 | filter | tail -2
for r in one two cut; do cp "$work/$r/metrics.jsonl" "$out/metrics_$r.jsonl" 2>/dev/null; done
# torch.compile last: each process compiles its own graphs (the first step pays it)
if [ -z "${TINY:-}" ]; then  # TINY=1: the same flow at toy sizes on a CPU, compile left out
  bench 100 d512 --case "16 train.compile=true"
  bench 100 d128 --case "4 train.compile=true"
fi
python3 bench/train_7b_report.py "$out" | tee "$out/summary.md"
echo "total: $(( $(date +%s) - t0 )) s"
