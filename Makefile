# luksvm — build and test entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: test deps lint unit integration e2e demo clean docs rpm deb

test: deps lint
	$(PY) -m pytest -q tests/unit tests/integration tests/e2e

deps:
	@tools/install-deps

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: deps
	$(PY) -m pytest -q tests/unit

integration: deps
	$(PY) -m pytest -q tests/integration

e2e: deps
	$(PY) -m pytest -q tests/e2e

# luksvm's main job on the e2e tier's seed host VM, told from its journal (tools/demo.py).
demo: deps
	$(PY) -m tools.demo

# Manual pages, bash completion and the example luksvm.conf (tools/gendocs.py) into build/docs.
docs:
	/usr/bin/python3 -m tools.gendocs build/docs

# Source and binary RPMs from the working tree into $(DISTDIR); RELEASE=2 for a rebuilt release.
DISTDIR ?= dist
RELEASE ?= 1
rpm: deps
	packaging/build-rpm $(DISTDIR) $(RELEASE)

# luksvm_VERSION-RELEASE_all.deb from the working tree into $(DISTDIR), built with debhelper and
# pybuild (packaging/debian); RELEASE=2 for a rebuilt package that upgrades the first.
deb: deps
	packaging/build-deb $(DISTDIR) $(RELEASE)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
