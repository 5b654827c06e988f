# Every target bootstraps what it needs: uv (installed with pip if missing), the venv
# (on this machine's python3; uv never downloads an interpreter) and the dependencies.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3

TOOLS := .tools
UV := $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
VENV := .venv
SYNCED := $(VENV)/.synced
PY := $(VENV)/bin/python
OLDEST := .venv-oldest

.PHONY: demo test test-oldest lint bench soak dist clean

$(TOOLS)/bin/uv:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv

$(SYNCED): pyproject.toml $(wildcard uv.lock) $(wildcard adapters/*/pyproject.toml) | $(UV)
	$(UV) venv --quiet --allow-existing --python python3 $(VENV)
	$(UV) sync --quiet --all-packages --all-extras
	@touch $@

demo: $(SYNCED)
	$(PY) examples/runaway_refund_loop.py

# The suite runs on one worker per CPU (pytest-xdist): every test has its own database
# (a SQLite file or a PostgreSQL schema) and its own ports, so workers share nothing.
# PYTEST_WORKERS=0 runs it in this one process.
PYTEST_WORKERS ?= auto

test: $(SYNCED)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS)

# The adapters' tests on the oldest framework versions they declare (the lower bounds,
# pinned in ci/oldest-constraints.txt), in a fresh venv of their own with the dev group.
test-oldest: | $(UV)
	$(UV) venv --quiet --clear --python python3 $(OLDEST)
	$(UV) pip install --quiet --python $(OLDEST)/bin/python -c ci/oldest-constraints.txt \
		--group dev -e . -e './adapters/openai-agents[stripe]' -e './adapters/langchain[stripe,agents]'
	$(OLDEST)/bin/python -m pytest -q -n $(PYTEST_WORKERS) adapters/openai-agents/tests adapters/langchain/tests

lint: $(SYNCED)
	$(VENV)/bin/ruff check src adapters tests examples bench
	$(VENV)/bin/ruff format --check src adapters
	$(VENV)/bin/mypy

bench: $(SYNCED)
	$(PY) bench/ledger_bench.py

# The vendor-truth simulations (a generic vendor, then Stripe), seed after seed, each for
# PAYMASTER_SOAK_SECONDS (default 600) on SQLite, and on PostgreSQL too when
# PAYMASTER_TEST_POSTGRES_URL is set; PAYMASTER_SIM_SEED picks the first seed. A failing seed is printed with the command that replays it.
soak: $(SYNCED)
	$(PY) tests/vendor_sim.py
	$(PY) tests/stripe_sim.py

# The three wheels and sdists (paymaster and both adapters) into dist/, for plain pip:
#   pip install dist/paymaster-*.whl dist/paymaster_openai_agents-*.whl
dist: | $(UV)
	rm -rf dist
	$(UV) build --quiet --all-packages -o dist
	@ls dist

clean:
	rm -rf $(VENV) $(OLDEST) $(TOOLS) dist .pytest_cache .mypy_cache .ruff_cache
