# The two commands: `make run` starts the proxy, `make test` runs the whole suite.
#   make run                                  config.yaml, on the port it names (server.port)
#   make run PORT=9000 CONFIG=my-config.yaml  another port and/or config file
# `make run` installs only what running needs; `make test` adds the test tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
CONFIG ?= config.yaml
PORT ?=

.PHONY: run test coverage lint format bench bench-peers soak fuzz sdk-suite clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/proxy serve --config $(CONFIG)$(if $(PORT), --port $(PORT))

# pytest on 4 workers (2 cores: the suite mostly waits on process start-ups, timeouts and
# sleeps), then the timing-sensitive tests (marked serial) alone.
test: $(STAMP)
	bash scripts/install-test-services.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict proxy
	$(BIN)/pytest -q -n 4 --dist worksteal -m "not serial"
	$(BIN)/pytest -q -m serial

# In-process coverage of proxy/ (the tests that start processes are left out: their
# coverage would be in the proxy processes).
coverage: $(STAMP)
	$(BIN)/pytest -q -m "not e2e" --cov=proxy --cov-report=term-missing

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict proxy

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

# Random requests, hostile upstream answers and hostile config files against a running
# proxy, checking the invariants (an 8 s version runs in `make test`).
FUZZ_SECONDS ?= 120
SEED ?= 1
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --seconds $(FUZZ_SECONDS) --seed $(SEED)

# The openai-python SDK's own API tests against a Prism mock of its spec, directly and
# through the proxy (scripts/sdk_suite.py; downloads into .cache/sdk-suite/; ~5 min).
sdk-suite: $(STAMP)
	$(BIN)/python scripts/sdk_suite.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
