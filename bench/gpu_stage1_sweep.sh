#!/usr/bin/env bash
# Stage-1 variants side by side on one lent GPU (bench/stage1_curve.py per variant, concurrently):
#   bash bench/gpu_carry.sh            # here, once
#   bash bench/gpu_stage1_sweep.sh     # on the GPU machine (results in $OUT/*.json)
source bench/gpu_env.sh
out=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
steps=${STEPS:-"600 1500 3000"}
common="data.train_images=4000 tasks.0.max_eval=100 tasks.1.max_eval=200"
vqa="tasks.0.max_eval=600"
declare -A variants=(
  [A_targets_b32]="train.loss_vocab=targets"
  [B_targets_b16]="train.loss_vocab=targets train.batch_size=16"
  [C_targets_b32_lr2e-3]="train.loss_vocab=targets train.lr=2e-3"
  [D_full_b32]="train.loss_vocab=full"
  [E_targets_b16_lr2e-3]="train.loss_vocab=targets train.batch_size=16 train.lr=2e-3"
)
python3 - <<'PY'  # write the worlds once, before the variants read them concurrently
from mmagent.train.data.tasks import shapes_files
from mmagent.train.recipe import DataSection
for n in (4000, 2000):
    shapes_files(DataSection(train_images=n))
PY
for name in "${!variants[@]}"; do
  OMP_NUM_THREADS=2 python3 bench/stage1_curve.py --steps $steps --vqa-steps 300 --out "$out/$name.json" \
    --align $common ${variants[$name]} --vqa $vqa > "$out/$name.log" 2>&1 &
done
wait
grep -h stage1_steps "$out"/*.log | head -40
for f in "$out"/*.log; do echo "== $f"; tail -3 "$f" | cut -c1-300; done
