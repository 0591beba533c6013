# Every target creates the virtual environment and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check provisioner tests bench
	$(BIN)/ruff format --check provisioner tests bench

typecheck: $(STAMP)
	$(BIN)/mypy provisioner

unit: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/vault_bench.py
	$(BIN)/python bench/phase1_bench.py --sizes 1000,10000,100000 --ansible 1000
	$(BIN)/python bench/push_bench.py
	$(BIN)/python bench/reply_check_bench.py
	$(BIN)/python bench/fleet_bench.py
	$(BIN)/python bench/journal_bench.py --hosts 10000
	$(BIN)/python bench/hostile_bench.py

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache
