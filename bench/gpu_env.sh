# Source on the lent GPU machine (no package index there): mmagent from a path shim, the few pure-Python
# packages it needs beyond the image's torch/transformers/peft from .carry/site, the converted SmolLM2
# tokenizer from .carry/cache. Build .carry with bench/gpu_carry.sh on the development machine.
# MM_TREE=head: the package as last committed (.carry/head.tar.gz, written by gpu_carry.sh), not the working
# tree, where other engineers' edits may be half done; the bench scripts are always the working tree's.
root=$(pwd)
pkg=$root
if [ "${MM_TREE:-work}" = head ]; then
  pkg=$(mktemp -d) && tar xzf "$root"/.carry/head.tar.gz -C "$pkg"
fi
shim=$(mktemp -d)
mkdir -p "$shim/mmagent"
for f in "$pkg"/sdk/*; do ln -s "$f" "$shim/mmagent/"; done
for d in train export recipes; do ln -s "$pkg/$d" "$shim/mmagent/$d"; done
export PYTHONPATH=$shim:$root/.carry/site MMAGENT_CACHE=$root/.carry/cache
