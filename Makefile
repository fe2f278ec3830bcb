# fedrpc: make run | make test | make bench | make lint | make demo
# The venv (.venv) is built on first use and reinstalled only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.bench-installed
# Installed on its own first, from the pin in pyproject.toml: any other version
# pulls a multi-GB CUDA build.
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

.DEFAULT_GOAL := install
.PHONY: install run test bench lint demo

install: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	@test -n "$(TORCH)" || { echo "Makefile: no torch==X pin found in pyproject.toml" >&2; exit 1; }
	$(BIN)/pip install '$(TORCH)'
	$(BIN)/pip install -e '.[test]'
	touch $@

$(BENCH_INSTALLED): $(INSTALLED)
	$(BIN)/pip install -e '.[test,bench]'
	touch $@

# Starts its own PostgreSQL and S3 under .data/ unless DATABASE_URL / FEDRPC_S3_ENDPOINT are set.
run: $(INSTALLED)
	$(BIN)/fedrpc serve

# The suite starts its own throwaway PostgreSQL and S3. Extra arguments: make test PYTEST_ARGS='-k name'.
# pytest exits with 5 when it collected nothing, which must not pass for a green run.
test: $(INSTALLED)
	@status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: FAILED, pytest ran no tests" >&2; exit 1; fi; \
	exit $$status

# Every public bench/*.py (not _private helpers), one after another.
bench: $(BENCH_INSTALLED)
	@set -e; for script in bench/*.py; do \
		case "$$(basename "$$script")" in _*) continue ;; esac; \
		test -e "$$script" || continue; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# 20 simulated devices, 5 rounds, on a throwaway embedded PostgreSQL, S3 and server.
demo: $(INSTALLED)
	$(BIN)/fedrpc simulate --devices 20 --rounds 5 --plot .data/demo.png
