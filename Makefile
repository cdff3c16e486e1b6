# Every target creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test check bench bench-quick tools clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graygate demo

# nginx, wrk and redis-server (Debian packages) for the tests; installed when missing.
tools:
	bash benchmarks/install_tools.sh

test: $(STAMP) tools
	$(PY) -m pytest -q

check: $(STAMP)
	$(VENV)/bin/ruff format --check proxy tests benchmarks scripts
	$(VENV)/bin/ruff check proxy tests benchmarks scripts
	$(VENV)/bin/mypy

bench: $(STAMP) tools
	$(PY) -m benchmarks.run

# A smoke run: written under /tmp so it never overwrites the published benchmarks/results/.
bench-quick: $(STAMP) tools
	$(PY) -m benchmarks.run --quick --out $${TMPDIR:-/tmp}/graygate-bench-quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
