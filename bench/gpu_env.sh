# Source on the lent GPU machine (no package index there): mmagent from a path shim, the few pure-Python
# packages it needs beyond the image's torch/transformers/peft from .carry/site, the converted SmolLM2
# tokenizer from .carry/cache. Build .carry with bench/gpu_carry.sh on the development machine.
root=$(pwd)
shim=$(mktemp -d)
mkdir -p "$shim/mmagent"
for f in "$root"/sdk/*; do ln -s "$f" "$shim/mmagent/"; done
for d in train export recipes; do ln -s "$root/$d" "$shim/mmagent/$d"; done
export PYTHONPATH=$shim:$root/.carry/site MMAGENT_CACHE=$root/.carry/cache
