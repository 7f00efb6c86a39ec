# xarray-zcache: `make demo` and `make test` each set everything up from scratch.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# the suite runs on two processes (CI has 2 cores); a module's tests stay together
PYTEST_WORKERS ?= 2

.PHONY: demo test quicktest system-deps lint typecheck format bench stress docs clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@set -e; py=$$(scripts/find-python); echo "Using $$py"; \
	  [ -x $(PY) ] || $$py -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip install -q -e ".[test,dashboard,docs,demo]"
	@touch $(STAMP)

## demo: local S3 server + sample dataset, read cold / warm / after a restart
demo: $(STAMP)
	$(PY) -m xarray_zcache.demo $(DEMO_ARGS)

## test: lint, type-check, build the docs and run the test suite
test: $(STAMP) system-deps lint typecheck docs
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## system-deps: a headless browser for the dashboard test (Debian packages; needs root,
## otherwise that one test is skipped with the reason)
system-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing chromium and chromium-driver (dashboard browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: no chromium/chromedriver and no root: the dashboard browser test will be skipped"; fi

## quicktest: the suite without the slow tests (xarray round trips, demo, notebook)
quicktest: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## docs: build the documentation (warnings are errors)
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -q -W --keep-going -E -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy xarray_zcache

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: the benchmark suite (BENCH_ARGS=--quick for a short run); results in docs/benchmarks.md
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/aggregator.py --workers 1000 --seconds 30

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info docs/_build

## stress: the reliability scenarios of make test, run longer (counts as flags: STRESS_ARGS, see --help)
stress: $(STAMP)
	$(PY) benchmarks/stress.py $(STRESS_ARGS)
