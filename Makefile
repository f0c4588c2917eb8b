# Each target sets up what it needs: a .venv with jaxckpt and its extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

test: $(STAMP)
	$(BIN)/ruff check jaxckpt tests benchmarks demo.py
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/async_save.py

clean:
	rm -rf $(VENV) *.egg-info
