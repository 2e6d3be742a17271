#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what bench/gpu_env.sh needs on the GPU machine: pure-Python packages
# from this machine's .venv (pycocoevalcap without its Java jars) and the converted SmolLM2 tokenizer.
set -euo pipefail
sp=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .carry && mkdir -p .carry/site .carry/cache
cp -r "$sp"/{rich,markdown_it,mdurl,pygments} .carry/site/
(cd "$sp" && find pycocoevalcap -name '*.py' ! -path '*/meteor/*' ! -path '*/spice/*') | while read -r f; do
  mkdir -p ".carry/site/$(dirname "$f")" && cp "$sp/$f" ".carry/site/$f"; done
.venv/bin/python -c "from mmagent.train.builtin import smollm2_tokenizer; smollm2_tokenizer()"
cp -r "${MMAGENT_CACHE:-$HOME/.cache/mmagent}/tokenizer-smollm2" .carry/cache/
git archive HEAD sdk train export recipes cli.py | gzip > .carry/head.tar.gz  # for MM_TREE=head (gpu_env.sh)
find .carry -name __pycache__ -prune -exec rm -rf {} +
du -sh .carry
