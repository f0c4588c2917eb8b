# Each target sets up what it needs: a venv ($(VENV)) with jaxckpt and its extras.
#   make test          lint + the test suite + the docs build in .venv (python3)
#   make docs          the docs site into site/ (mkdocs build --strict: broken links fail it)
#   make test-newest   the test suite in .venv-newest: Python $(NEWEST_VERSION), newest JAX the ranges admit
# test-newest leaves out the packaging tests: they build their own Python 3.13 venv in make test.
# Both are parameterised on PYTHON and VENV, e.g. `make pytest PYTHON=python3.12 VENV=.venv312`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SOURCES := src tests benchmarks demo.py docs/hooks.py docs/gen_performance.py docs/benchmarks/run.py

# The interpreter for test-newest: the highest $(pyenv root)/versions/3.13.N, else python3.13 on
# PATH (only if it runs: a pyenv shim without that version selected does not). Override with
# NEWEST_PYTHON=/path/to/python.
NEWEST_VERSION ?= 3.13
NEWEST_VENV    ?= .venv-newest
NEWEST_PYTHON  ?= $(shell \
  for p in $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/$(NEWEST_VERSION).*/bin/python 2>/dev/null \
              | grep -E '/versions/[0-9.]+/bin/python$$' | sort -V -r) python$(NEWEST_VERSION); do \
    "$$p" -c 'import sys; print(sys.executable)' 2>/dev/null && break; \
  done)

.PHONY: demo test docs lint ruff-check format-check typecheck pytest versions test-newest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

test: lint pytest docs

# Three targets, so that `make --keep-going lint` reports all three.
lint: ruff-check format-check typecheck

ruff-check: $(STAMP)
	$(BIN)/ruff check $(SOURCES)

format-check: $(STAMP)  # `ruff format --diff` shows the changes, `ruff format` makes them.
	$(BIN)/ruff format --check --output-format concise $(SOURCES)

typecheck: $(STAMP)  # Over src/jaxckpt/, configured in pyproject.toml.
	$(BIN)/mypy

versions: $(STAMP)
	@$(BIN)/python -c "import sys, importlib.metadata as m; print(f'$(VENV): Python {sys.version.split()[0]}',\
	  *(f'{p} {m.version(p)}' for p in ('jax', 'jaxlib', 'orbax-checkpoint', 'tensorstore', 'flax',\
	  'optax', 'numpy')), sep=', ')"

pytest: versions
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-newest:
	@if [ -z "$(NEWEST_PYTHON)" ]; then \
	  echo "test-newest: no Python $(NEWEST_VERSION): looked for \$$(pyenv root)/versions/$(NEWEST_VERSION).*/bin/python and python$(NEWEST_VERSION) on PATH; set NEWEST_PYTHON=/path/to/python" >&2; \
	  exit 1; fi
	$(MAKE) pytest PYTHON="$(NEWEST_PYTHON)" VENV=$(NEWEST_VENV) PYTEST_ARGS="-m 'not packaging'"

# Also regenerates docs/performance.md from docs/benchmarks/*.json (docs/hooks.py) and fails on a
# name in jaxckpt.__all__ without an entry in docs/api.md.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/async_save.py

clean:
	rm -rf $(VENV) $(NEWEST_VENV) *.egg-info site
