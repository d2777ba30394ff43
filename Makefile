# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps, one per purpose: `make serve` installs what serving needs, `make test` everything.
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: serve test lint typecheck unit e2e-deps bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The package with the test toolchain (its `test` extra holds the serving extras too).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# What serving needs and nothing more: the package with its `trio` and `fast` (uvloop) extras.
# Not again after `make test` (its stamp is newer than pyproject.toml: all of it is there).
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	if [ $(STAMP) -nt pyproject.toml ]; then :; else $(BIN)/python -m pip install --quiet -e '.[trio,fast]'; fi
	touch $@

# The docs site (MkDocs), warnings as errors, into site/.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict -d site

serve: $(SERVE_STAMP)
	$(BIN)/tank serve

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict tank_core tank_asyncio tank_trio tank_asgi tank_cli examples/selectors_server.py

# Node's ws and Debian's chromium for the end-to-end suite, Debian's redis-server for the cluster
# tests (installed when missing; the tests start and stop their own servers on free ports).
e2e-deps:
	bash tests/e2e/install_deps.sh
	bash tests/cluster/install_redis.sh

unit: $(STAMP) e2e-deps
	$(BIN)/pytest

test: lint typecheck docs unit

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/core_bench.py
	$(BIN)/python bench/server_bench.py
	$(BIN)/python bench/reconnect_storm.py
	$(BIN)/python bench/cluster_bench.py

clean:
	rm -rf $(VENV) build site *.egg-info
