#!/usr/bin/env bash
# Build llama.cpp's CUDA libraries (libllama with the CUDA and CPU ggml backends) from the llama.cpp source that
# llama-cpp-python vendors, for llama-cpp-python to load through LLAMA_CPP_LIB_PATH=BUILD/bin.
#   bash bench/gpu_build_llama.sh SRC BUILD [CUDA_ARCH]     (SRC: vendor/llama.cpp; 90 = H100/H200)
# Only libllama is built (no tools, no mtmd: the edge backend feeds image rows itself). FlashAttention kernels
# are left out (GGML_CUDA_FA=OFF): they are most of the compile time, and at these contexts (a few hundred
# positions) decode time is the weights' read, not attention. Dead-store elimination is off as in the
# Makefile (GCC drops the stores that fill llama.cpp's AMX tile configuration; the H200 hosts have AMX).
set -euo pipefail
src=$1 build=$2 arch=${3:-90}
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_C_FLAGS="-fno-dse -fno-tree-dse" -DCMAKE_CXX_FLAGS="-fno-dse -fno-tree-dse" \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
cmake --build "$build" -j"$(nproc)" --target llama
ls -la "$build"/bin
