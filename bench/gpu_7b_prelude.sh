# Sourced by the 7B GPU scripts (gpu_train_7b.sh, gpu_profile_7b.sh, gpu_graphs_7b.sh): the environment, the
# card and versions in $OUT/when.txt, a work folder (RAM if 48 GB fit), and the InstructBLIP-Vicuna-7B-shaped
# base (random weights, an HF directory) with its two data sets, written once.
source bench/gpu_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
out=${OUT:-/tmp/out}; mkdir -p "$out"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, accelerate as a; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"; } | tee "$out/when.txt"
free_shm=$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)
work=${WORK:-/tmp/b7}; [ "${free_shm:-0}" -gt 48 ] && work=/dev/shm/b7  # 16 GB of weights: RAM if it fits
mkdir -p "$work"
filter() { grep -v -E "Loading weights|Writing model|warn|Warning|USDT|^\s*$" || true; }
t0=$(date +%s)
[ -f "$work/base/config.json" ] || python3 bench/train_7b.py base "$work/base" ${TINY:+--tiny} 2>&1 | filter
python3 bench/train_7b.py data "$work/d128" --text 128 ${TINY:+--tiny} | filter
python3 bench/train_7b.py data "$work/d512" --text 512 ${TINY:+--tiny} | filter
echo "base + data: $(( $(date +%s) - t0 )) s"
