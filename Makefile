# NeuroLens: `make run` serves the demo, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: run test test-all bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes; the stamp file records the last install.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/neurolens serve --demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The slow tests too (full-size presets, long kills-and-resumes).
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

bench: $(VENV)/.installed
	$(PY) bench/server_load.py

clean:
	rm -rf $(VENV) neurolens-data .pytest_cache
