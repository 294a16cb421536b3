.PHONY: help install install-flex test test-full test-flex ci lint bench docs docs-serve

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install the package with dev tools
	python -m pip install -e ".[dev]"

install-flex:  ## the flex extra (TF 2.18.1's Flex interpreter; Python 3.11/3.12, a venv of its own)
	python -m pip install -e ".[flex,dev]"

test:  ## the default test suite (README's command)
	python -m pytest

test-full:  ## also the slow end-to-end runs
	python -m pytest -m "slow or not slow"

test-flex:  ## the tests that need a Flex file (after make install-flex)
	python -m pytest -m flex

ci:  ## what CI runs: fresh 3.11, 3.13 and flex venvs, all suites (~46-59 min)
	bash .ci/run

lint:  ## ruff + mypy + the import layering (pyproject.toml [tool.importlinter])
	ruff check fl_ondevice tests experiments
	ruff format --check fl_ondevice tests experiments
	mypy fl_ondevice
	lint-imports

bench:  ## device benchmark: TFLite vs TF vs Keras train step
	python -m experiments.bench_device

docs:  ## build the documentation site strictly into site/ (needs the docs extra: pip install -e ".[docs]")
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

docs-serve:  ## serve the documentation site at http://127.0.0.1:8000, rebuilt on every edit
	NO_MKDOCS_2_WARNING=1 mkdocs serve
