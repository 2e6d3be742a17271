#!/usr/bin/env bash
# Build llama.cpp's CUDA libraries (libllama with the CUDA and CPU ggml backends) from the llama.cpp source that
# llama-cpp-python vendors, for llama-cpp-python to load through LLAMA_CPP_LIB_PATH=BUILD/bin.
#   bash bench/gpu_build_llama.sh SRC BUILD [CUDA_ARCH]     (SRC: vendor/llama.cpp; 90 = H100/H200)
# Only libllama is built (no tools, no mtmd: the edge backend feeds image rows itself). FlashAttention kernels
# are left out (GGML_CUDA_FA=OFF): they are most of the compile time, and at these contexts (a few hundred
# positions) decode time is the weights' read, not attention. The CPU backend is built for AVX-512 without
# AMX, and with dead-store elimination off as in the Makefile: a first build here with -march=native (AMX on,
# GCC 13.3) segfaulted in llama_model_load_from_file on the H200 host, with and without a visible GPU
# (2026-11-28; docs/BENCHMARKS.md), and GCC's dropped stores to the AMX tile configuration are the known
# cause of llama.cpp crashes on these CPUs.
# Shared libraries export nothing from static archives (-Wl,--exclude-libs,ALL). The second build here (no
# AMX, no dead-store elimination) still segfaulted at model load; cuda-gdb showed libllama's std::ostream
# insertion (llama_model::print_info) running inside libggml-cuda.so: that library carried and exported its
# own static copy of libstdc++ (the image's GCC in /opt/gcc), which interposed on the system libstdc++ that
# made the stream (2026-11-28, docs/BENCHMARKS.md). The check after the build fails on any such export.
set -euo pipefail
src=$1 build=$2 arch=${3:-90}
echo "compilers: $(command -v gcc) $(command -v g++); libstdc++ g++ links: $(g++ -print-file-name=libstdc++.so)"
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_SHARED_LINKER_FLAGS="-Wl,--exclude-libs,ALL" \
  -DCMAKE_C_FLAGS="-fno-dse -fno-tree-dse" -DCMAKE_CXX_FLAGS="-fno-dse -fno-tree-dse" \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
cmake --build "$build" -j"${MM_BUILD_JOBS:-$(nproc)}" --target llama  # fewer jobs: leave CPUs to a run beside it
ls -la "$build"/bin
command -v nm > /dev/null || { echo "no nm: exported libstdc++ symbols not checked"; exit 0; }
leaks=0
for lib in "$build"/bin/lib*.so; do  # a C++ standard library symbol exported here would interpose on the system's
  n=$(nm -D --defined-only "$lib" | grep -c ' _ZNSo9_M_insert\| _ZNSt6locale\| _ZNSt8ios_base' || true)
  echo "$(basename "$lib"): $n exported libstdc++ stream/locale symbols; needs $(readelf -d "$lib" | grep -o 'libstdc++[^]]*' || echo 'no libstdc++.so')"
  [ "$n" = 0 ] || leaks=1
done
[ "$leaks" = 0 ] || { echo "a library exports libstdc++ symbols: it would crash llama.cpp at model load"; exit 4; }
