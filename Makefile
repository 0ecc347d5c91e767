# Two commands on a fresh machine: `make run` (install + the main job) and `make test` (install + lint + types + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
RUN_DIR ?= runs/demo

.PHONY: run test install install-test lint types pytest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/facesearch demo --out $(RUN_DIR)

lint: install-test
	$(BIN)/ruff check engine indexer model benchmarks tests
	$(BIN)/ruff format --check engine indexer model benchmarks tests

types: install-test
	$(BIN)/mypy engine indexer model benchmarks

pytest: install-test
	$(BIN)/python -m pytest -q -ra

test: lint types pytest

clean:
	rm -rf $(VENV) build *.egg-info runs
