# The two commands: `make serve` serves the bundled demo repository; `make test` runs every test.
# `make serve` installs only the serving dependencies (`pip install -e .`); `make test` adds the
# test extra. Each has its own stamp in the venv, redone when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test lint proto demo-models

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# The test extra holds the serving dependencies too, so this one install stands for both stamps.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(SERVE_STAMP) $@

serve: $(SERVE_STAMP)
	$(BIN)/onnxgate serve $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

proto: $(TEST_STAMP)
	$(BIN)/python proto/generate.py

demo-models: $(TEST_STAMP)
	$(BIN)/python server/onnxgate/demo/build_demo.py
