# One command runs the service (`make dev`), one runs the tests (`make test`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: dev test lint openapi floors clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(PY) -m app dev

lint: $(STAMP)
	$(VENV)/bin/ruff check app devtools tests bench .ci
	$(VENV)/bin/ruff format --check app devtools tests bench .ci
	$(VENV)/bin/mypy app devtools

openapi: $(STAMP)
	$(PY) -m app openapi

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

# The lowest dependency versions pyproject.toml allows, in a venv of their own, smoke-tested (CI runs it).
floors:
	$(PYTHON) .ci/floors.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
