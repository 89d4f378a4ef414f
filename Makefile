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

# pyproject.toml's requires-python (">=3.11,<3.12"): pip installs Kiln on no other Python
REQUIRES_PYTHON := $(shell sed -n 's/^requires-python *= *"\([^"]*\)".*/\1/p' pyproject.toml)

# Exits 0 when the version v (e.g. 3.11.9) meets every clause of spec (e.g. ">=3.11,<3.12";
# empty: any). Clauses: >=, >, <=, <, ==, != (the last two also with a trailing .*), ~=.
define VERSION_FITS_AWK
function cmp(a, b,    x, y, n, m, k, i) {
	n = split(a, x, "."); m = split(b, y, "."); k = n > m ? n : m
	for (i = 1; i <= k; i++) {
		if (x[i] + 0 < y[i] + 0) return -1
		if (x[i] + 0 > y[i] + 0) return 1
	}
	return 0
}
function starts(a, p,    x, y, m, i) {
	split(a, x, "."); m = split(p, y, ".")
	for (i = 1; i <= m; i++) if (x[i] + 0 != y[i] + 0) return 0
	return 1
}
BEGIN {
	n = split(spec, clauses, ",")
	for (j = 1; j <= n; j++) {
		c = clauses[j]; gsub(/[ \t]/, "", c)
		if (c == "") continue
		if (!match(c, /^(~=|==|!=|<=|>=|<|>)/)) exit 2
		op = substr(c, 1, RLENGTH); w = substr(c, RLENGTH + 1)
		star = sub(/\.\*$$/, "", w)
		if (op == "==") ok = star ? starts(v, w) : cmp(v, w) == 0
		else if (op == "!=") ok = star ? !starts(v, w) : cmp(v, w) != 0
		else if (op == ">=") ok = cmp(v, w) >= 0
		else if (op == ">") ok = cmp(v, w) > 0
		else if (op == "<=") ok = cmp(v, w) <= 0
		else if (op == "<") ok = cmp(v, w) < 0
		else { p = w; sub(/\.[^.]*$$/, "", p); ok = cmp(v, w) >= 0 && starts(v, p) }
		if (!ok) exit 1
	}
	exit 0
}
endef
export VERSION_FITS_AWK

.PHONY: browser postgres install run test lint clean venv

# The stamp is rebuilt when pyproject.toml changes, so `make run` re-installs
# only when the dependencies did.
$(VENV)/.installed: pyproject.toml | venv
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

# The venv, on a Python that requires-python allows: $(PYTHON), else python3 if that one
# fits. Was: any python3 (3.12 where python3.11 was missing), which `pip install -e .`
# then refused, and the wrong venv was kept even after Python 3.11 was installed. A venv
# on a Python that does not fit is refused, not deleted: it may hold more than Kiln.
venv:
	@fits() { v=$$("$$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) \
		&& [ -n "$$v" ] && awk -v v="$$v" -v spec='$(REQUIRES_PYTHON)' "$$VERSION_FITS_AWK"; }; \
	if [ -e $(BIN)/python ] || [ -L $(BIN)/python ]; then \
		fits $(BIN)/python && exit 0; \
		echo "make: $(VENV) runs Python $${v:-(none: $(BIN)/python does not run)}, and pyproject.toml requires-python is '$(REQUIRES_PYTHON)'." >&2; \
		echo "make: remove it (rm -rf $(VENV)) and run make again: it is rebuilt with $(PYTHON)." >&2; \
		exit 1; \
	fi; \
	found=; \
	for py in $(PYTHON) python3; do \
		command -v "$$py" >/dev/null 2>&1 || { found="$$found $$py: not found;"; continue; }; \
		if fits "$$py"; then echo "make: creating $(VENV) with $$py (Python $$v)"; exec "$$py" -m venv $(VENV); fi; \
		found="$$found $$py: Python $${v:-that does not run};"; \
	done; \
	echo "make: no Python that pyproject.toml allows (requires-python '$(REQUIRES_PYTHON)'):$$found" >&2; \
	echo "make: install one (e.g. python3.11, with its venv module), or run make PYTHON=/path/to/it" >&2; \
	exit 1

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
	rm -rf data/raw data/clean data/validation data/data_docs data/models data/latents data/eval data/checkpoints data/cache mlflow.db mlartifacts
