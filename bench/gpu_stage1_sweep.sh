#!/usr/bin/env bash
# Stage-1 variants side by side on one lent GPU (bench/stage1_curve.py per variant, concurrently):
#   bash bench/gpu_carry.sh            # here, once
#   bash bench/gpu_stage1_sweep.sh     # on the GPU machine (results in $OUT/*.json)
source bench/gpu_env.sh
out=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
steps=${STEPS:-"600 1500 3000"}
common="data.train_images=4000 tasks.0.max_eval=100 tasks.1.max_eval=200"
# the VQA stage as recipes/vqa.toml was when these sweeps ran (docs/stage1_sweeps/): LoRA r=8, LLM q/v +
# Q-Former query/value; a variant's own --vqa overrides come after and win
vqa="tasks.0.max_eval=600 lora.r=8 lora.alpha=16 'lora.llm=[\"q_proj\",\"v_proj\"]' 'lora.bridge=[\"query\",\"value\"]' 'lora.vision=[]'"
# name -> extra arguments of bench/stage1_curve.py (SWEEP picks a set); 8 queries unless a variant says
declare -A variants
if [ "${SWEEP:-1}" = 1 ]; then variants=(
  [A_targets_b32]="--align train.loss_vocab=targets"
  [B_targets_b16]="--align train.loss_vocab=targets train.batch_size=16"
  [C_targets_b32_lr2e-3]="--align train.loss_vocab=targets train.lr=2e-3"
  [D_full_b32]="--align train.loss_vocab=full"
  [E_targets_b16_lr2e-3]="--align train.loss_vocab=targets train.batch_size=16 train.lr=2e-3"
); else variants=(
  [F_p16_48px]="--vision patch_size=16 image_size=48 --align train.loss_vocab=targets data.image_size=48 --vqa data.image_size=48"
  [G_p8_48px]="--vision patch_size=8 image_size=48 --align train.loss_vocab=targets data.image_size=48 --vqa data.image_size=48"
  [H_q16]="--queries 16 --align train.loss_vocab=targets"
  [I_vqa_direct]="--align train.loss_vocab=targets tasks.0.name=vqa tasks.0.kind=vqa tasks.1.name=vqa2 tasks.1.kind=vqa"
  [J_p16_48px_lr3e-3]="--vision patch_size=16 image_size=48 --align train.loss_vocab=targets train.lr=3e-3 data.image_size=48 --vqa data.image_size=48"
  [K_4layers_vit]="--vision num_hidden_layers=4 --align train.loss_vocab=targets"
); fi
if [ "${SWEEP:-1}" = 3 ]; then variants=(
  [P1_q16]="--queries 16 --steps 3000 --vqa-steps 600 2000 --align train.loss_vocab=targets"
  [P3_q16_bigLoRA]="--queries 16 --steps 3000 --vqa-steps 2000 --align train.loss_vocab=targets --vqa lora.r=16 'lora.llm=[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]' 'lora.bridge=[\"query\",\"key\",\"value\",\"dense\"]' 'lora.vision=[\"qkv\"]'"
  [P4_q16_1500]="--queries 16 --steps 1500 --vqa-steps 600 2000 --align train.loss_vocab=targets"
); fi
if [ "${SWEEP:-1}" = 4 ]; then  # BLIP-2's contrastive first stage (recipe [contrast]) before the captions,
  vqa="tasks.0.max_eval=600"    # then the VQA stage as recipes/vqa.toml is now
  variants=(
  [Q0_no_contrast_1500]="--queries 16 --steps 1500 --vqa-steps 600"
  [Q1_contrast600_1500]="--queries 16 --steps 1500 --vqa-steps 600 --align contrast.steps=600"
  [Q2_contrast1500_1500]="--queries 16 --steps 1500 --vqa-steps 600 --align contrast.steps=1500"
  [Q3_contrast1500_800]="--queries 16 --steps 800 --vqa-steps 600 --align contrast.steps=1500"
  [Q4_contrast3000_1500]="--queries 16 --steps 1500 --vqa-steps 600 --align contrast.steps=3000"
); fi
if [ "${SWEEP:-1}" = 5 ]; then  # world v5: a caption that counts every shape, zeros included
  vqa="tasks.0.max_eval=600"
  variants=(
  [R0_world5_1500]="--queries 16 --steps 1500 --vqa-steps 600"
  [R1_world5_contrast1000_1500]="--queries 16 --steps 1500 --vqa-steps 600 --align contrast.steps=1000"
  [R2_world5_2000]="--queries 16 --steps 2000 --vqa-steps 600"
); fi
if [ "${SWEEP:-1}" = 6 ]; then  # world v7 (a place-first caption, counts per shape) against v6, two seeds;
  vqa="tasks.0.max_eval=600"    # C6_* run the v6 code carried as .carry-sweep/head.tar.gz (its own cache)
  s1="--align run.seed=1 --vqa run.seed=1"
  variants=(
  [C6_s0]="--queries 16 --steps 1500 --vqa-steps 600"
  [C6_s1]="--queries 16 --steps 1500 --vqa-steps 600 $s1"
  [W7_s0]="--queries 16 --steps 1500 --vqa-steps 600 1000"
  [W7_s1]="--queries 16 --steps 1500 --vqa-steps 600 $s1"
  [W7_2000_s0]="--queries 16 --steps 2000 --vqa-steps 600"
  [W7_2000_s1]="--queries 16 --steps 2000 --vqa-steps 600 $s1"
  [W7_contrast600_s0]="--queries 16 --steps 1500 --vqa-steps 600 --align contrast.steps=600"
); fi
if [ "${SWEEP:-1}" = 7 ]; then  # the default as it is (world v6, 16 queries, recipes/vqa.toml) against
  vqa="tasks.0.max_eval=600"    # stage-1 steps, two seeds: the curve of docs/RESULTS.md (--plot)
  variants=()  # POINTS7="1000:0 2400:0 2400:1" (steps:seed) picks the points; the default is the full curve
  for point in ${POINTS7:-600:0 600:1 1200:0 1200:1 1800:0 1800:1 2400:0 2400:1 3000:0 3000:1}; do
    n=${point%:*} seed=${point#*:}
    variants[T${n}_s$seed]="--queries 16 --steps $n --vqa-steps 600 --align run.seed=$seed --vqa run.seed=$seed"
  done
fi
if [[ ${SWEEP:-1} == 6 && -f .carry-sweep/head.tar.gz ]]; then  # the committed code, for the control variants (C*)
  head=$(mktemp -d) && tar xzf .carry-sweep/head.tar.gz -C "$head" && mkdir -p "$head/shim/mmagent"
  for f in "$head"/sdk/*; do ln -s "$f" "$head/shim/mmagent/"; done
  for d in train export recipes; do ln -s "$head/$d" "$head/shim/mmagent/$d"; done
  cp -r "$MMAGENT_CACHE" "$head/cache"
  (cd "$head" && PYTHONPATH=$head/shim:${PYTHONPATH#*:} MMAGENT_CACHE=$head/cache python3 -c "
from mmagent.train.data.tasks import shapes_files
from mmagent.train.recipe import DataSection
shapes_files(DataSection(train_images=4000, image_size=64))")
fi
python3 - <<'PY'  # write the worlds once, before the variants read them concurrently
import os
from mmagent.train.data.tasks import shapes_files
from mmagent.train.recipe import DataSection
for n in (4000,) if os.environ.get("SWEEP") == "7" else (4000, 2000):
    for size in (64,) if os.environ.get("SWEEP") == "7" else (64, 48):
        shapes_files(DataSection(train_images=n, image_size=size))
PY
for name in "${!variants[@]}"; do
  case "${variants[$name]}" in *--steps*) args="";; *) args="--steps $steps --vqa-steps 300";; esac
  env=""; [[ $name == C* && -n ${head:-} ]] && env="PYTHONPATH=$head/shim:${PYTHONPATH#*:} MMAGENT_CACHE=$head/cache"
  eval "$env OMP_NUM_THREADS=2 python3 bench/stage1_curve.py $args --queries 8 --out \"$out/$name.json\" --align $common \
    --vqa $vqa ${variants[$name]}" > "$out/$name.log" 2>&1 &
done
wait
for f in "$out"/*.log; do echo "== $f"; grep -h stage1_steps "$f" || tail -3 "$f" | cut -c1-300; done
rm -f "$out"/*.log
