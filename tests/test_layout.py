"""Keeps the layout of STYLE.md and docs/architecture.md honest by reading the source (AST),
like mitmproxy's test/filename_matching.py: pure modules stay pure, the data plane stays free
of aiohttp, prometheus_client and per-request logging, docstrings stay short, benchmarks/ is
never imported by proxy/, and every module has its test file."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"
TESTS = ROOT / "tests"

MODULES = sorted(p.stem for p in PROXY.glob("*.py"))
PURE = ("config", "state", "router", "headers", "stats", "analysis")
DATA_PLANE = ("downstream", "upstream", "exchange")
# Third-party packages a pure module may import, per module (docs/architecture.md).
PURE_THIRD_PARTY = {"config": {"yaml"}}
# Never in the data plane's hot path (DESIGN.md "Two planes", STYLE.md).
DATA_PLANE_FORBIDDEN = {
    "aiohttp",
    "prometheus_client",
    "proxy.metrics",  # metrics are rendered at scrape time from stats, not bumped per request
    "proxy.admin",
    "proxy.app",
    "proxy.ctl",
    "proxy.cli",
    "proxy.sample",
}
# Log levels that would put a line per request on the module logger (STYLE.md habit 10:
# INFO only for state changes, per-request lines on a separate, off-by-default access logger).
PER_REQUEST_LOG_CALLS = {"info", "debug"}

# Modules whose tests live elsewhere than tests/test_<name>.py, and where. Keep it short:
# a module listed here is a module without a unit test file.
TESTED_ELSEWHERE = {
    # The sample upstreams behind `graygate demo`: exercised by test_e2e's demo test.
    "sample": ("test_e2e.py",),
    # Wiring and lifetimes: every in-process test runs the real App (conftest `gateway`),
    # and test_e2e drives start, reload and shutdown through the real command.
    "app": ("test_e2e.py", "conftest.py"),
    # argv parsing and dispatch: test_e2e and test_ctl run the real `python -m proxy`.
    "cli": ("test_e2e.py", "test_ctl.py"),
}
NO_TEST_NEEDED = ("__init__", "__main__")


@cache
def tree(module: str) -> ast.Module:
    path = PROXY / f"{module}.py"
    return ast.parse(path.read_text(), filename=str(path))


def imports(module: str) -> set[str]:
    """Every module name imported anywhere in the file (also inside functions and
    TYPE_CHECKING blocks: a pure module must not even name an impure one)."""
    found: set[str] = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = "proxy" + (f".{node.module}" if node.module else "")
                if node.module is None:
                    found.update(f"proxy.{a.name}" for a in node.names)
                else:
                    found.add(base)
                continue
            assert node.module is not None
            if node.module == "proxy":
                # `from proxy import rollout` names a module; `from proxy import __version__`
                # only the package itself.
                found.update(
                    f"proxy.{a.name}" if (PROXY / f"{a.name}.py").exists() else "proxy"
                    for a in node.names
                )
            else:
                found.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    found.discard("__future__")
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_module_list_matches_the_architecture() -> None:
    # Guards the parametrisation below: a renamed module must not silently escape the rules.
    for name in PURE + DATA_PLANE:
        assert name in MODULES, f"proxy/{name}.py is gone; update test_layout.py"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_only_stdlib_and_pure_modules(module: str) -> None:
    allowed_third = PURE_THIRD_PARTY.get(module, set())
    bad = []
    for name in sorted(imports(module)):
        if top(name) == "proxy":
            if name != "proxy" and name.split(".")[1] not in PURE:
                bad.append(f"{name} (an impure proxy module)")
        elif top(name) in allowed_third:
            continue
        elif top(name) not in sys.stdlib_module_names:
            bad.append(f"{name} (third party)")
        elif top(name) in ("asyncio", "uvloop"):
            bad.append(f"{name} (event loop)")
    assert not bad, f"proxy/{module}.py is [pure] but imports: {', '.join(bad)}"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_avoid_io_libraries(module: str) -> None:
    names = {top(n) for n in imports(module)}
    banned = {"asyncio", "aiohttp", "prometheus_client", "uvloop", "httptools", "socket"}
    assert not names & banned, f"proxy/{module}.py imports {sorted(names & banned)}"


@pytest.mark.parametrize("module", DATA_PLANE)
def test_data_plane_imports_no_control_plane(module: str) -> None:
    names = imports(module)
    bad = sorted(n for n in names if n in DATA_PLANE_FORBIDDEN or top(n) in DATA_PLANE_FORBIDDEN)
    assert not bad, f"proxy/{module}.py is data plane but imports {bad}"


@pytest.mark.parametrize("module", DATA_PLANE)
def test_data_plane_has_no_per_request_logging(module: str) -> None:
    bad = []
    for node in ast.walk(tree(module)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            bad.append(f"line {node.lineno}: print()")
        elif (
            isinstance(func, ast.Attribute)
            and func.attr in PER_REQUEST_LOG_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id in ("logger", "logging", "log")
        ):
            bad.append(f"line {node.lineno}: {func.value.id}.{func.attr}()")
    assert not bad, f"proxy/{module}.py logs on the hot path: {bad}"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_short_docstring(module: str) -> None:
    doc = ast.get_docstring(tree(module), clean=True)
    assert doc, f"proxy/{module}.py has no module docstring (STYLE.md: what it owns)"
    lines = doc.strip().splitlines()
    assert len(lines) <= 5, f"proxy/{module}.py docstring has {len(lines)} lines (max 5)"


@pytest.mark.parametrize("module", MODULES)
def test_benchmarks_never_imported_by_proxy(module: str) -> None:
    names = imports(module)
    assert not any(top(n) == "benchmarks" for n in names), f"proxy/{module}.py imports benchmarks"


def missing_test_files() -> list[str]:
    return [
        m
        for m in MODULES
        if m not in NO_TEST_NEEDED
        and not (TESTS / f"test_{m}.py").exists()
        and m not in TESTED_ELSEWHERE
    ]


def test_every_module_has_a_test_file_or_a_reason() -> None:
    missing = missing_test_files()
    assert not missing, "no tests/test_<name>.py and not in TESTED_ELSEWHERE: " + ", ".join(
        f"proxy/{m}.py" for m in missing
    )


@pytest.mark.parametrize("module", sorted(TESTED_ELSEWHERE))
def test_allow_list_stays_honest(module: str) -> None:
    assert module in MODULES, f"TESTED_ELSEWHERE names proxy/{module}.py, which is gone"
    assert not (TESTS / f"test_{module}.py").exists(), (
        f"tests/test_{module}.py exists now: drop {module!r} from TESTED_ELSEWHERE"
    )
    for name in TESTED_ELSEWHERE[module]:
        assert (TESTS / name).exists(), f"TESTED_ELSEWHERE[{module!r}] names missing {name}"


def test_no_stray_test_files() -> None:
    # tests/test_<name>.py mirrors proxy/<name>.py, or is a named cross-module suite.
    cross_module = {
        "e2e",
        "proxy",
        "failures",
        "hostile",
        "live",
        "bench",
        "metrics_e2e",
        "rollout_e2e",
        "layout",
        "conformance",
        # HTTP hardening, one suite per class of defect, across downstream and exchange
        "response_framing",
        "slow_readers",
        "upgrades",
        "control_bytes",
    }
    stray = [
        p.name
        for p in TESTS.glob("test_*.py")
        if p.stem[5:] not in MODULES and p.stem[5:] not in cross_module
    ]
    assert not stray, f"test files that mirror no module: {stray} (add them to cross_module)"
