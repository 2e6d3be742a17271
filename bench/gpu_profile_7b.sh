#!/usr/bin/env bash
# Issue 15's profile and issue 10's recipe memory on one lent GPU, in one call: the InstructBLIP-Vicuna-7B shape
# (random weights, an HF directory loaded through model.base) profiled at B4·T160 and B16·T544
# (bench/profile_7b.py), then the peak memory of the three 7B-class recipes (bench/recipe_memory.py).
#   here:       bash bench/gpu_carry.sh
#   on the GPU: bash bench/gpu_profile_7b.sh          (device kind nvidia-h200, carry .carry)
set -uo pipefail
source bench/gpu_7b_prelude.sh
timeout 120 python3 bench/profile_7b.py "$work/base" "$work/d128" --batch 4 --out "$out" 2>&1 | filter \
  | tee "$out/profile.jsonl"
timeout 90 python3 bench/profile_7b.py "$work/base" "$work/d512" --batch 16 --out "$out" \
  --variants as_is,noautocast+fused 2>&1 | filter | tee -a "$out/profile.jsonl"
echo "profiles: $(( $(date +%s) - t0 )) s"
mkdir -p "$work/mem" && ln -sfn "$work/base" "$work/mem/base_instructblip"
timeout 240 python3 bench/recipe_memory.py "$work/mem" ${TINY:+--tiny} 2>&1 | filter | grep '^{' | tee "$out/memory.jsonl"
echo "total: $(( $(date +%s) - t0 )) s"
