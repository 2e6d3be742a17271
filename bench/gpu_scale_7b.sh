#!/usr/bin/env bash
# Issue 15, third round, on a lent 2-GPU machine, in two calls made while the machine is held (the base and
# data the first writes to /dev/shm are there for the second):
#   here:       bash bench/gpu_carry.sh && cp /work/shared/bench/baseline_train_7b.py .carry/
#   there:      MM_TREE=head bash bench/gpu_scale_7b.sh scale; MM_TREE=head bash bench/gpu_scale_7b.sh speed
#               (kind nvidia-h200-x2, carry .carry; the base is written once, then found in /dev/shm)
#               MM_TREE=head bash bench/gpu_scale_7b.sh fsdp    (an FSDP checkpoint of the 7B resumed on 1 GPU)
# speed: on GPU 0, the baseline (its own run(), B16·T512) and ours with CUDA graphs and fused_ops
#        (RMSNorm, rotary, now SwiGLU), same card, same call.
# scale: one global batch of 32·T128+32 (16 a GPU) with CUDA graphs + fused_ops: 1 GPU (micro-batch 16,
#        2 accumulated) against 2 GPUs (16 each; gradients averaged by hand, train/distributed.py), the 2-GPU
#        run's step-8 checkpoint resumed on 1 GPU; then FSDP full fine-tuning on 2 GPUs when the recipe has
#        train.sharding. Results: $OUT/*.jsonl, metrics_*.jsonl, summary.md (bench/train_7b_report.py).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
source bench/gpu_7b_prelude.sh
g=train.cuda_graphs=true; f=train.fused_ops=true
bench() { timeout "$1" python3 bench/train_7b.py speed "$work/base" "$work/$2" "${@:3}" 2>&1 | grep '^{' | tee -a "$out/ours.jsonl"; }
case ${1:-} in
speed)
  export CUDA_VISIBLE_DEVICES=0
  timeout 60 python3 -c "
import json, sys; sys.path.insert(0, '.carry'); import baseline_train_7b as b
rate = b.matmul_rate(); print(json.dumps({'bf16_matmul_TFLOPs': round(rate / 1e12, 1)}), flush=True)
for B, T, steps in ((16, 512, 8),):
    r = b.run('lora', B, T, steps, False); r['mfu_llm_est'] = round(r['llm_tflops'] * 1e12 / rate, 3)
    print(json.dumps(r), flush=True)" 2>&1 | grep '^{' | tee "$out/baseline.jsonl"
  bench 170 d512 --case "16 $g $f"  # (with $c: refused since 2026-11-28, compiled dropout cannot be captured)
  ;;
scale)
  keys=(train.steps=16 train.lr=1e-4 train.warmup_steps=3 train.checkpoint_every=8 "$g" "$f")
  run=(bench/train_7b.py steps "$work/base" "$work/d128")
  launch=(-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
          --dynamo_backend no)
  logged() {  # logged NAME SECONDS COMMAND...: the whole output to $out/NAME.log, its end here
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" 2>&1 | filter > "$out/$name.log"; tail -3 "$out/$name.log"
  }
  rm -rf "$work"/{one,two,cut,fsdp,mix_eager,mix_graphs}
  CUDA_VISIBLE_DEVICES=0 logged one 100 python3 "${run[@]}" "$work/one" "${keys[@]}" train.batch_size=16 train.grad_accum=2
  logged two 110 python3 "${launch[@]}" "${run[@]}" "$work/two" "${keys[@]}" train.batch_size=32
  cp -r "$work/two" "$work/cut" && rm -rf "$work/cut/checkpoints/step-16" "$work/cut/.lock"
  CUDA_VISIBLE_DEVICES=0 logged cut 90 python3 "${run[@]}" "$work/cut" --resume "${keys[@]}" train.batch_size=16 \
    train.grad_accum=2
  for r in one two cut; do cp "$work/$r/metrics.jsonl" "$out/metrics_$r.jsonl" 2>/dev/null; done
  # CUDA graphs on mixed lengths (several captured shapes) with 4 micro-batches accumulated, against eager:
  # what making them the default on one GPU waits for
  python3 bench/train_7b.py data "$work/dmix" --text 256 --mixed ${TINY:+--tiny} | filter
  mix=(train.steps=12 train.lr=1e-4 train.warmup_steps=2 train.checkpoint_every=0 train.batch_size=4 train.grad_accum=4
       lora.dropout=0.0)
  for m in eager graphs; do
    CUDA_VISIBLE_DEVICES=0 logged "mix_$m" 100 python3 bench/train_7b.py steps "$work/base" "$work/dmix" \
      "$work/mix_$m" "${mix[@]}" "$([ $m = graphs ] && echo "$g" || echo train.cuda_graphs=false)"
    cp "$work/mix_$m/metrics.jsonl" "$out/metrics_mix_$m.jsonl" 2>/dev/null
  done
  if [ -z "${MM_NO_FSDP:-}" ] && python3 -c "from mmagent.train.recipe import TrainSection as T; assert 'sharding' in T.__dataclass_fields__" 2>/dev/null; then
    fsdp=(train.steps=8 train.lr=1e-5 train.warmup_steps=2 train.checkpoint_every=0 train.method=full
          train.precision=bf16-true train.sharding=fsdp train.batch_size=8)
    logged fsdp 150 python3 "${launch[@]}" "${run[@]}" "$work/fsdp" "${fsdp[@]}"
    cp "$work/fsdp/metrics.jsonl" "$out/metrics_fsdp.jsonl" 2>/dev/null
  fi
  ;;
fsdp)  # not run yet: a 7B full fine-tuning checkpoint written under FSDP (gathered whole on rank 0, about 47 GB
       # of host memory) and resumed on one GPU with the same step split in two (about 74 GiB there)
  k=(train.steps=10 train.lr=1e-5 train.warmup_steps=2 train.checkpoint_every=5 train.method=full
     train.precision=bf16-true train.sharding=fsdp)
  launch=(-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
          --dynamo_backend no)
  rm -rf "$work/fsdp2"
  timeout 300 python3 "${launch[@]}" bench/train_7b.py steps "$work/base" "$work/d128" "$work/fsdp2" "${k[@]}" \
    train.batch_size=8 2>&1 | filter | grep -E '^\{|FSDP units|Error' | tee "$out/fsdp2.log"
  cp "$work/fsdp2/metrics.jsonl" "$out/metrics_fsdp2.jsonl"; ls -l "$work/fsdp2/checkpoints/step-5" | tee -a "$out/fsdp2.log"
  rm -rf "$work/fsdp2/checkpoints/step-10"
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/train_7b.py steps "$work/base" "$work/d128" "$work/fsdp2" --resume \
    "${k[@]}" train.batch_size=4 train.grad_accum=2 2>&1 | filter | grep -E '^\{|resumed|nothing to shard|Error' \
    | tee -a "$out/fsdp2.log"
  cp "$work/fsdp2/metrics.jsonl" "$out/metrics_fsdp2_resumed.jsonl"
  ;;
*) echo "usage: bash bench/gpu_scale_7b.sh speed|scale|fsdp"; exit 2 ;;
esac
python3 bench/train_7b_report.py "$out" | tee "$out/summary.md"
echo "total: $(( $(date +%s) - t0 )) s"
