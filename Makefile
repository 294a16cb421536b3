.PHONY: help install test test-full lint bench

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## install the package with dev tools
	python -m pip install -e ".[dev]"

test:  ## the default test suite (README's command)
	python -m pytest

test-full:  ## also the slow end-to-end runs
	python -m pytest -m "slow or not slow"

lint:  ## ruff + mypy
	ruff check fl_ondevice tests experiments
	ruff format --check fl_ondevice tests experiments
	mypy fl_ondevice

bench:  ## device benchmark: TFLite vs TF vs Keras train step
	python -m experiments.bench_device
