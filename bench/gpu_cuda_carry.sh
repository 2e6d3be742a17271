#!/usr/bin/env bash
# Fill .cuda/ and .cuda-ort/ (git-ignored) with what bench/gpu_kernels.sh needs on a lent GPU machine (torch,
# transformers, peft, onnxruntime's CPU build; no package index): llama.cpp's source from llama-cpp-python
# 0.3.36's sdist, trimmed to what libllama needs (2 MB), to build its CUDA libraries there; llama-cpp-python's
# Python package; gguf; the converted SmolLM2 tokenizer; onnxruntime-gpu 1.31.1 (CUDA 13, cp312) without its
# CUDA provider in .cuda/, and the provider with sm_90 cubins only (bench/fatbin_keep_arch.py) in .cuda-ort/:
# the two do not fit the 64 MB one call carries, so the provider travels in a second call.
#   bash bench/gpu_cuda_carry.sh          (downloads once into ~/.cache/mmagent/cuda-carry)
set -euo pipefail
root=$(pwd)
dl=${MMAGENT_CACHE:-$HOME/.cache/mmagent}/cuda-carry
mkdir -p "$dl"
py=.venv/bin/python
[ -f "$dl"/llama_cpp_python-0.3.36.tar.gz ] || $py -m pip download -q --no-deps --no-binary=:all: -d "$dl" llama-cpp-python==0.3.36
[ -f "$dl"/gguf-0.19.0-py3-none-any.whl ] || $py -m pip download -q --no-deps -d "$dl" gguf==0.19.0
ls "$dl"/onnxruntime_gpu-1.31.1-*.whl >/dev/null 2>&1 || $py -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d "$dl" onnxruntime-gpu==1.31.1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf .cuda .cuda-ort && mkdir -p .cuda .cuda-ort "$tmp"/src "$tmp"/site
tar xzf "$dl"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
sdist=$tmp/llama_cpp_python-0.3.36
cp -r "$sdist"/vendor/llama.cpp/{CMakeLists.txt,cmake,include,src,ggml,vendor,LICENSE} "$tmp"/src/
rm -rf "$tmp"/src/vendor/cpp-httplib "$tmp"/src/ggml/src/ggml-{blas,cann,et,hexagon,hip,metal,musa,opencl,openvino,rpc,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn}
tar cf - -C "$tmp"/src . | gzip -9 > .cuda/llama-src.tar.gz
cp -r "$sdist"/llama_cpp "$tmp"/site/
unzip -q "$dl"/gguf-0.19.0-py3-none-any.whl -d "$tmp"/site
unzip -q "$dl"/onnxruntime_gpu-1.31.1-*.whl 'onnxruntime/*' -d "$tmp"/site
capi=$tmp/site/onnxruntime/capi
mv "$capi"/libonnxruntime_providers_cuda.so "$tmp"/
rm -f "$capi"/libonnxruntime_providers_tensorrt.so "$capi"/libonnxruntime.so.*  # the pybind module holds the runtime
sp=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
(cd "$sp" && find pycocoevalcap -name '*.py' ! -path '*/meteor/*' ! -path '*/spice/*') | while read -r f; do
  mkdir -p "$tmp/site/$(dirname "$f")" && cp "$sp/$f" "$tmp/site/$f"; done
cp -r "$sp"/diskcache "$tmp"/site/  # llama_cpp imports it; the GPU image lacks it
find "$tmp"/site -name __pycache__ -prune -exec rm -rf {} +
tar cf - -C "$tmp"/site . | gzip -6 > .cuda/site.tar.gz
$py -c "from mmagent.train.builtin import smollm2_tokenizer; smollm2_tokenizer()"
tar cf - -C "${MMAGENT_CACHE:-$HOME/.cache/mmagent}" tokenizer-smollm2 | gzip -9 > .cuda/cache.tar.gz
git archive HEAD sdk train export recipes | gzip > .cuda/head.tar.gz  # for gpu_kernels.sh`s `committed`
$py bench/fatbin_keep_arch.py "$tmp"/libonnxruntime_providers_cuda.so "$tmp"/providers_cuda.so 90
xz -9e -T0 -c "$tmp"/providers_cuda.so > .cuda-ort/libonnxruntime_providers_cuda.so.xz
du -sh .cuda .cuda-ort
