# fedrpc: make run | make test | make bench | make lint | make demo | make lock
# The venv (.venv) is built on first use and reinstalled only when pyproject.toml or a
# lock file in requirements/ changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.bench-installed
# Every package but torch at an exact version with its sha256 hashes (make lock writes them).
# bench.lock is the test and bench extras resolved together; test.lock is its subset for
# the test extra, at the same versions, so make bench only adds packages to the venv and
# make test never swaps them back (the price: Flower's upper bounds hold back what it
# shares with the server, protobuf and packaging among them).
TEST_LOCK := requirements/test.lock
BENCH_LOCK := requirements/bench.lock
# Installed on its own first, from the pin in pyproject.toml: any other version
# pulls a multi-GB CUDA build. Its dependencies (sympy, networkx, ...) come from the lock.
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

.DEFAULT_GOAL := install
.PHONY: install run test bench lint demo lock

install: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-deps everywhere: the lock is the whole set; pip check proves it is consistent
# (torch's and fedrpc's own requirements included). --no-build-isolation builds the
# editable fedrpc with the locked setuptools instead of fetching one.
$(INSTALLED): pyproject.toml $(TEST_LOCK) | $(BIN)/python
	@test -n "$(TORCH)" || { echo "Makefile: no torch==X pin found in pyproject.toml" >&2; exit 1; }
	$(BIN)/pip install --no-deps '$(TORCH)'
	$(BIN)/pip install --no-deps --require-hashes -r $(TEST_LOCK)
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

$(BENCH_INSTALLED): $(INSTALLED) $(BENCH_LOCK)
	$(BIN)/pip install --no-deps --require-hashes -r $(BENCH_LOCK)
	$(BIN)/pip check
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

# Re-resolves both locks from pyproject.toml, every package at its newest allowed release
# (make lock LOCK_ARGS= keeps the current pins and only adds what pyproject.toml added;
# LOCK_ARGS='--upgrade-package NAME' moves one). Needs PyPI. Resolved for CPython 3.11 on
# x86-64 Linux against the CPU torch wheel in TORCH_WHEELS, whose requirements are the ones
# installed (PyPI's torch adds CUDA packages); torch itself stays out of the lock.
UV_VERSION := 0.13.9
UV_DIR := $(VENV)/uv-$(UV_VERSION)
LOCK_ARGS ?= --upgrade
TORCH_WHEELS ?= /opt/wheels
LOCK_FLAGS = --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--find-links $(TORCH_WHEELS) -c $(VENV)/torch-cpu.txt --no-emit-package torch \
	--prerelease disallow --custom-compile-command 'make lock' \
	--quiet $(LOCK_ARGS)

$(UV_DIR)/bin/uv: | $(BIN)/python
	$(BIN)/pip install --no-deps --target $(UV_DIR) 'uv==$(UV_VERSION)'

lock: $(UV_DIR)/bin/uv
	@ls $(TORCH_WHEELS)/$(subst ==,-,$(TORCH))+cpu-*.whl >/dev/null 2>&1 || { echo "make lock: no $(subst ==,-,$(TORCH))+cpu wheel in TORCH_WHEELS=$(TORCH_WHEELS)" >&2; exit 1; }
	echo '$(TORCH)+cpu' > $(VENV)/torch-cpu.txt
	$(UV_DIR)/bin/uv pip compile pyproject.toml --extra test --extra bench $(LOCK_FLAGS) -o $(BENCH_LOCK)
	$(UV_DIR)/bin/uv pip compile pyproject.toml --extra test -c $(BENCH_LOCK) $(LOCK_FLAGS) -o $(TEST_LOCK)
