#!/usr/bin/env bash
# Issue 15's profile and issue 10's recipe memory on one lent GPU, in one call: the InstructBLIP-Vicuna-7B shape
# (random weights, an HF directory loaded through model.base) profiled at B4·T160 and B16·T544
# (bench/profile_7b.py), then the peak memory of the three 7B-class recipes (bench/recipe_memory.py).
#   here:       bash bench/gpu_carry.sh
#   on the GPU: bash bench/gpu_profile_7b.sh          (device kind nvidia-h200, carry .carry)
set -uo pipefail
source bench/gpu_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
out=${OUT:-/tmp/out}; mkdir -p "$out"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"; } | tee "$out/when.txt"
free_shm=$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)
work=${WORK:-/tmp/b7}; [ "${free_shm:-0}" -gt 48 ] && work=/dev/shm/b7  # 16 GB of weights: RAM if it fits
mkdir -p "$work"
filter() { grep -v -E "Loading weights|Writing model|warn|Warning|USDT|^\s*$" || true; }
t0=$(date +%s)
python3 bench/train_7b.py base "$work/base" ${TINY:+--tiny} 2>&1 | filter
python3 bench/train_7b.py data "$work/d128" --text 128 ${TINY:+--tiny} | filter
python3 bench/train_7b.py data "$work/d512" --text 512 ${TINY:+--tiny} | filter
echo "base + data: $(( $(date +%s) - t0 )) s"
timeout 120 python3 bench/profile_7b.py "$work/base" "$work/d128" --batch 4 --out "$out" 2>&1 | filter \
  | tee "$out/profile.jsonl"
timeout 90 python3 bench/profile_7b.py "$work/base" "$work/d512" --batch 16 --out "$out" \
  --variants as_is,noautocast+fused 2>&1 | filter | tee -a "$out/profile.jsonl"
echo "profiles: $(( $(date +%s) - t0 )) s"
mkdir -p "$work/mem" && ln -sfn "$work/base" "$work/mem/base_instructblip"
timeout 240 python3 bench/recipe_memory.py "$work/mem" ${TINY:+--tiny} 2>&1 | filter | grep '^{' | tee "$out/memory.jsonl"
echo "total: $(( $(date +%s) - t0 )) s"
