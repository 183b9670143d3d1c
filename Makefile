# Set-up is idempotent: .venv is made once and re-synced when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install model test test-fast serve bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# torch first and pinned, so nothing below can pull another build of it.
	$(BIN)/pip install -q "torch==2.13.0"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

model: install
	$(BIN)/flashserve fetch $(MODEL)

test: model
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

serve: model
	$(BIN)/flashserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

bench: install
	$(BIN)/pip install -q -e ".[bench]" || echo "llama-cpp-python not installed: peer columns will be skipped"
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV)
