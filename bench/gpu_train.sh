#!/usr/bin/env bash
# The VQA recipe on a lent GPU (bf16 autocast), against the CPU numbers in docs/BENCHMARKS.md.
# The GPU image has torch/transformers/peft but no network: mmagent runs from a path shim instead of an
# install, and the cached builtin:tiny base and tokenizer come along in .carry/cache (see docs/BENCHMARKS.md).
#   run on the device: bash bench/gpu_train.sh
set -euo pipefail
root=$(pwd)
shim=$(mktemp -d)
mkdir -p "$shim/mmagent"
for f in "$root"/sdk/*; do ln -s "$f" "$shim/mmagent/"; done
for d in train export recipes; do ln -s "$root/$d" "$shim/mmagent/$d"; done
export PYTHONPATH=$shim MMAGENT_CACHE=$root/.carry/cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
out=${OUT:-/tmp/out}
start=$(date +%s)
python3 cli.py train recipes/vqa.toml run.output_dir="$out/vqa_gpu" 2>&1 | grep -v -E "Loading weights|FutureWarning|warnings.warn" | tail -25
echo "wall seconds: $(( $(date +%s) - start ))"
python3 - "$out/vqa_gpu/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
print("median samples/s (GPU):", round(statistics.median(r["samples_per_s"] for r in rows), 1), "final loss", round(rows[-1]["loss"], 3))
PY
