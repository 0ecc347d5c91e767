# Two commands on a fresh machine: `make run` (install + the main job) and `make test` (install + lint + types + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
RUN_DIR ?= runs/demo
SRC := facesearch model indexer engine benchmarks

.PHONY: run test test-fast install install-test lint types pytest pytest-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[cpu]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[cpu,test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/facesearch demo --out $(RUN_DIR)

lint: install-test
	$(BIN)/ruff check $(SRC) tests
	$(BIN)/ruff format --check $(SRC) tests

# mypy cannot follow setuptools' editable import hook, so it checks the installed layout through a tree of links
# (facesearch/ plus facesearch/{model,indexer,engine,benchmarks} -> the repository's folders).
types: install-test
	rm -rf build/typecheck && mkdir -p build/typecheck/facesearch
	for f in facesearch/*; do ln -s ../../../$$f build/typecheck/facesearch/; done
	for d in model indexer engine benchmarks; do ln -s ../../../$$d build/typecheck/facesearch/$$d; done
	$(BIN)/mypy build/typecheck/facesearch

pytest: install-test
	$(BIN)/python -m pytest -q -ra

# The inner loop: everything but the tests marked @pytest.mark.slow (~2.5 minutes on 2 cores, where the whole
# suite takes ~6); `make test` still runs them all.
pytest-fast: install-test
	$(BIN)/python -m pytest -q -ra -m "not slow"

test: lint types pytest

test-fast: lint types pytest-fast

clean:
	rm -rf $(VENV) build *.egg-info runs
