# Every target creates .venv when it is missing and installs the project into it.
# The install is editable and compiled with mypyc where a C compiler works (setup.py); an
# edit under proxy/ rebuilds it before the next demo, test or bench, and until then
# proxy/build.py loads the edited .py files instead of the extensions.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BUILT  := $(VENV)/.built-stamp
SOURCES := setup.py $(shell find proxy -name '*.py')
# The pure build as a machine without a C compiler gets it, in a venv of its own.
PURE_VENV ?= .venv-pure
# `make test` fails unless the compiled build runs (tests/test_build.py); 0 expects pure.
GRAYGATE_EXPECT_COMPILED ?= 1

.PHONY: demo test test-pure check bench bench-quick perf-count tools clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $(STAMP) $(BUILT)  # that install built it too

$(BUILT): $(STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-deps -e .
	@touch $(BUILT)

demo: $(BUILT)
	$(VENV)/bin/graygate demo

# nginx, wrk and redis-server (Debian packages) for the tests; installed when missing.
tools:
	bash benchmarks/install_tools.sh

test: $(BUILT) tools
	GRAYGATE_EXPECT_COMPILED=$(GRAYGATE_EXPECT_COMPILED) $(PY) -m pytest -q

# CC=false: the compiler probe fails, so setup.py installs pure Python, non-editable, as on
# a machine without a C compiler. The data-plane and HTTP tests (marker both_builds) then
# run against that copy: PYTHONSAFEPATH keeps the checkout off the front of sys.path and a
# .pth puts it at the end (for tests/ and benchmarks/), so `import proxy` is the pure copy.
test-pure: tools
	rm -rf $(PURE_VENV)
	$(PYTHON) -m venv $(PURE_VENV)
	CC=false $(PURE_VENV)/bin/python -m pip install -q '.[test]'
	$(PURE_VENV)/bin/python -c 'import pathlib, site; \
		pathlib.Path(site.getsitepackages()[0], "graygate-checkout.pth").write_text("$(CURDIR)\n")'
	PYTHONSAFEPATH=1 $(PURE_VENV)/bin/python -c 'import proxy, sys; \
		assert proxy.__file__.startswith(sys.prefix), proxy.__file__'
	$(PURE_VENV)/bin/graygate --version | grep -x 'graygate .* (pure python)'
	PYTHONSAFEPATH=1 GRAYGATE_EXPECT_COMPILED=0 $(PURE_VENV)/bin/python -m pytest -q -m both_builds

check: $(STAMP)
	$(VENV)/bin/ruff format --check proxy tests benchmarks scripts setup.py
	$(VENV)/bin/ruff check proxy tests benchmarks scripts setup.py
	$(VENV)/bin/mypy

bench: $(BUILT) tools
	$(PY) -m benchmarks.run

# A smoke run: written under /tmp so it never overwrites the published benchmarks/results/.
bench-quick: $(BUILT) tools
	$(PY) -m benchmarks.run --quick --out $${TMPDIR:-/tmp}/graygate-bench-quick

# Callgrind instructions per request, compiled and pure (README: Benchmarks).
perf-count: $(BUILT) tools
	@command -v valgrind >/dev/null || { test "$$(id -u)" -eq 0 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind; } \
		|| { echo "valgrind missing: apt-get install -y valgrind (as root)" >&2; exit 1; }
	$(PY) -m benchmarks.perf_count

clean:
	rm -rf $(VENV) $(PURE_VENV) build .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find proxy \( -name '*.so' -o -name '_compiled.json' \) -delete
