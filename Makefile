# The two commands: `make serve` serves the bundled demo repository; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint proto demo-models

$(BIN)/onnxgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

serve: $(BIN)/onnxgate
	$(BIN)/onnxgate serve $(ARGS)

test: $(BIN)/onnxgate
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(BIN)/onnxgate
	$(BIN)/ruff check .

proto: $(BIN)/onnxgate
	$(BIN)/python proto/generate.py

demo-models: $(BIN)/onnxgate
	$(BIN)/python server/onnxgate/demo/build_demo.py
