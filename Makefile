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

.PHONY: run test lock coverage lint format bench profile bench-peers soak fuzz sdk-suite prices clean

# Installs come from the lock files (requirements/*.txt, every package pinned with its hashes),
# never from floating versions: a fresh clone installs exactly what was tested. `make lock`
# refreshes them on purpose (see the README); tests/test_lock.py fails when they and
# pyproject.toml disagree. The project itself goes in with --no-build-isolation, so that its
# build backend is the locked setuptools too.
LOCK_INPUTS := pyproject.toml requirements/build.in
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile $(LOCK_INPUTS) --universal --python-version 3.11 --generate-hashes --quiet$(if $(UPGRADE), --upgrade)
LOCK_VENV := .venv-lock

# The locked files go in with uv (itself installed from its locked hash): ~4x faster than pip
# on a fresh clone, which CI always is; pip does it where uv cannot reach an index. Bytecode
# is compiled at install (as pip does): with PYTHONDONTWRITEBYTECODE set, every process the
# tests start would otherwise compile its imports again (~0.3 s of CPU each).
UV := $(LOCK_VENV)/bin/uv
INSTALL = $(UV) pip install --quiet --compile-bytecode --python $(BIN)/python --require-hashes -r $(1) \
	|| $(BIN)/pip install --quiet --require-hashes -r $(1)

$(UV): requirements/lock-tool.txt
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --require-hashes -r requirements/lock-tool.txt
	touch $(UV)

$(STAMP): requirements/dev.txt pyproject.toml $(UV)
	$(PYTHON) -m venv $(VENV)
	$(call INSTALL,requirements/dev.txt)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -q proxy tests
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): requirements/run.txt pyproject.toml $(UV)
	$(PYTHON) -m venv $(VENV)
	$(call INSTALL,requirements/run.txt)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m compileall -q proxy
	touch $(RUN_STAMP)

# Bring the lock in line with pyproject.toml, keeping every pin that still fits (uv, itself
# installed from its own locked hash); `make lock UPGRADE=1` takes the newest releases allowed.
# Run it on purpose: after editing pyproject.toml's dependencies, or to take releases (a
# security fix), then `make test`, and commit the lock with the result.
UPGRADE ?=
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --require-hashes -r requirements/lock-tool.txt
	$(UV_COMPILE) -o requirements/run.txt
	$(UV_COMPILE) --extra dev -o requirements/dev.txt
	$(LOCK_VENV)/bin/uv pip compile requirements/lock-tool.in --universal --generate-hashes --quiet -o requirements/lock-tool.txt

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

# The shipped price table (proxy/data/prices.json) from the pinned litellm wheel's catalogue
# (downloaded, never installed or imported); commit the result.
prices: $(STAMP)
	$(BIN)/python scripts/make_prices.py

bench: $(STAMP)
	bash bench/install-wrk.sh
	$(BIN)/python bench/run.py
	$(BIN)/python bench/streams.py

# Where a request's CPU goes, by layer and function, in µs per request (py-spy).
profile: $(STAMP)
	bash bench/install-wrk.sh
	$(BIN)/python bench/profile.py

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
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
