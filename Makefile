# The two commands: `make run` starts the proxy, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: run test lint format bench bench-peers soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/proxy serve --config $(CONFIG)

test: $(STAMP)
	bash scripts/install-test-services.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	bash bench/install-wrk.sh
	$(BIN)/python bench/run.py
	$(BIN)/python bench/streams.py

bench-peers: $(STAMP)
	bash bench/install-wrk.sh
	$(BIN)/python bench/peers.py

soak: $(STAMP)
	$(BIN)/python -m tests.soak --requests 20000 --concurrency 64

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
