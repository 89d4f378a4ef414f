# Kiln — the two commands of the README's quick start, plus helpers.
#   make run   : set up (if needed) and run the whole pipeline (tiny profile)
#   make test  : set up (if needed) and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= shapes
PROFILE ?= tiny
# scratch unless asked: a `kiln run --mode continue` earlier in this checkout leaves
# `mode: continue` in params.yaml, and `make run` trains from its initialisation
MODE ?= scratch
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers: one takes the e2e run and the tests
# built on it (the longest chain), the other the rest (tests/conftest.py groups them and
# gives each worker its share of the CPUs). `make test TEST_WORKERS=0`: one process.
TEST_WORKERS ?= 2

.PHONY: browser postgres install run test lint clean

# The stamp is rebuilt when pyproject.toml changes, so `make run` re-installs
# only when the dependencies did.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# Exactly 2.13.0: here that is the local CPU wheel; any looser spec would
	# download the multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	# img2dataset depends on the Python-3.6 `dataclasses` backport, which shadows
	# the standard library inside Prefect's ephemeral server. Remove it.
	$(BIN)/pip uninstall --quiet -y dataclasses 2>/dev/null || true
	$(BIN)/python -m training.doctor
	@touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/kiln run --dataset $(DATASET) --profile $(PROFILE) --mode $(MODE)

test: install browser postgres
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# Headless Chromium and its WebDriver for the report screenshot and playground tests
# (Debian's packages; needs root). Not fatal: without them those tests are skipped, and say so.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| ( (apt-get update -qq || true; apt-get install -y --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
		|| echo "make: chromium could not be installed; the browser tests will be skipped")

# PostgreSQL for the infra test that runs compose's Prefect and MLflow server command
# lines against it (Debian's package; needs root). Not fatal: without it that test is
# skipped, and says so.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| ( (apt-get update -qq || true; apt-get install -y --no-install-recommends postgresql) >/dev/null 2>&1 \
		|| echo "make: postgresql could not be installed; the PostgreSQL infra test will be skipped")

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data/raw data/clean data/data_docs data/models data/latents data/eval data/checkpoints data/cache mlflow.db mlartifacts
