"""Keeps the layout of STYLE.md and docs/architecture.md honest by reading the source (AST),
like mitmproxy's test/filename_matching.py. The rules are per folder, so no hand-kept list of
modules can drift: core/ is pure, dataplane/ never touches the control plane, only app and
cli reach control/, docstrings stay short, benchmarks/ is never imported by proxy/.
A fake tree with one violation of each rule proves the checker catches them."""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"

# Third-party packages each folder may import (the standard library is always allowed).
THIRD_PARTY = {
    "core": frozenset(),
    "dataplane": frozenset({"httptools", "uvloop"}),
}
# core/config may read YAML: parsing the file is the edge where config enters.
CORE_CONFIG_THIRD_PARTY = frozenset({"yaml"})
# The standard library's I/O and event loop stay out of core/ (decisions are pure).
CORE_FORBIDDEN_STDLIB = frozenset({"asyncio", "socket", "selectors", "subprocess", "threading"})
# Only these may import proxy.control (the wiring and the command line).
CONTROL_IMPORTERS = frozenset({"proxy.app", "proxy.cli"})
# Log levels that would put a line per request on the module logger (STYLE.md habit 10).
PER_REQUEST_LOG_CALLS = frozenset({"info", "debug"})
MAX_DOCSTRING_LINES = 5
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300


# Modules over a limit today, each with why; the list may only shrink (issue 9). Nothing in
# dataplane/ is on it once its split is done.
@dataclass(frozen=True)
class Module:
    name: str  # dotted: proxy.core.router
    path: Path
    tree: ast.Module

    @property
    def plane(self) -> str:
        """core, dataplane, control, or top (proxy/*.py)."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 2 else "top"


def load_modules(package: Path) -> list[Module]:
    modules = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        tree = ast.parse(path.read_text(), filename=str(path))
        modules.append(Module(".".join(parts), path, tree))
    return modules


def resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        assert node.module is not None
        return node.module
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: Module, known: set[str]) -> set[str]:
    """Every module name imported anywhere in the file (also inside functions and
    TYPE_CHECKING blocks: a pure module must not even name an impure one). `from a import b`
    names a.b when a.b is a module."""
    found: set[str] = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, node)
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found.update(subs or {base})
        elif (
            isinstance(node, ast.Call)
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


def import_violations(module: Module, names: set[str], package: str) -> list[str]:
    bad = []
    for name in sorted(names):
        ours = top(name) == package
        plane = name.split(".")[1] if ours and name.count(".") >= 1 else ""
        importer = module.name.replace(package, "proxy", 1)
        if (
            ours
            and plane == "control"
            and module.plane != "control"
            and importer not in CONTROL_IMPORTERS
        ):
            bad.append(f"{module.name} imports {name}: only app and cli reach control/")
            continue
        if module.plane == "core":
            allowed = THIRD_PARTY["core"]
            if module.name.startswith(f"{package}.core.config"):
                allowed = allowed | CORE_CONFIG_THIRD_PARTY
            if ours and plane != "core":
                bad.append(f"{module.name} is pure but imports {name}")
            elif not ours and top(name) in CORE_FORBIDDEN_STDLIB:
                bad.append(f"{module.name} is pure but imports {name} (I/O or event loop)")
            elif not ours and top(name) not in sys.stdlib_module_names | allowed:
                bad.append(f"{module.name} is pure but imports {name} (third party)")
        elif module.plane == "dataplane":
            if ours and plane not in ("core", "dataplane"):
                bad.append(f"{module.name} is data plane but imports {name}")
            elif not ours and top(name) not in sys.stdlib_module_names | THIRD_PARTY["dataplane"]:
                bad.append(f"{module.name} is data plane but imports {name} (third party)")
        if top(name) == "benchmarks":
            bad.append(f"{module.name} imports {name}: benchmarks/ is never imported by proxy/")
    return bad


def logging_violations(module: Module) -> list[str]:
    if module.plane != "dataplane":
        return []
    bad = []
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            bad.append(f"{module.name} line {node.lineno}: print()")
        elif (
            isinstance(func, ast.Attribute)
            and func.attr in PER_REQUEST_LOG_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id in ("logger", "logging", "log")
        ):
            bad.append(f"{module.name} line {node.lineno}: {func.value.id}.{func.attr}()")
    return bad


def docstring_violations(module: Module) -> list[str]:
    if module.path.name == "__init__.py":
        return []
    doc = ast.get_docstring(module.tree, clean=True)
    if not doc:
        return [f"{module.name} has no module docstring (STYLE.md: what it owns)"]
    lines = doc.strip().splitlines()
    if len(lines) > MAX_DOCSTRING_LINES:
        return [f"{module.name} docstring has {len(lines)} lines (max {MAX_DOCSTRING_LINES})"]
    return []


def size_violations(module: Module, package: str) -> list[str]:
    bad = []
    lines = len(module.path.read_text().splitlines())
    if lines > MAX_MODULE_LINES:
        bad.append(f"{module.name} has {lines} lines (max {MAX_MODULE_LINES})")
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > MAX_CLASS_LINES:
                bad.append(f"{module.name}.{node.name} has {size} lines (max {MAX_CLASS_LINES})")
    return bad


def import_cycles(modules: list[Module]) -> list[str]:
    """Every cycle among our own modules, TYPE_CHECKING imports included (a cycle there is
    a pair of modules that cannot be read, or split, apart)."""
    known = {m.name for m in modules}
    graph = {m.name: sorted(n for n in imports(m, known) if n in known) for m in modules}
    found: set[tuple[str, ...]] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :]
                at = cycle.index(min(cycle))
                found.add(tuple(cycle[at:] + cycle[:at]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return [f"import cycle: {' -> '.join((*c, c[0]))}" for c in sorted(found)]


def violations(package: Path) -> list[str]:
    modules = load_modules(package)
    known = {m.name for m in modules}
    bad: list[str] = []
    for m in modules:
        bad += import_violations(m, imports(m, known), package.name)
        bad += logging_violations(m)
        bad += docstring_violations(m)
        bad += size_violations(m, package.name)
    bad += import_cycles(modules)
    return bad


def test_the_planes_are_folders() -> None:
    planes = {p.name for p in PROXY.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert planes == {"core", "dataplane", "control"}
    top_modules = {p.stem for p in PROXY.glob("*.py")}
    assert top_modules == {"__init__", "__main__", "app", "build", "cli"}


def test_the_real_tree_keeps_every_rule() -> None:
    assert violations(PROXY) == []


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "fakepkg"


GOOD = '"""A module that keeps the rules."""\n'


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("core/router.py", '"""r."""\nimport asyncio\n', "is pure but imports asyncio"),
        ("core/router.py", '"""r."""\nimport aiohttp\n', "is pure but imports aiohttp"),
        ("core/router.py", '"""r."""\nimport yaml\n', "is pure but imports yaml"),
        (
            "core/router.py",
            '"""r."""\nfrom fakepkg.dataplane import upstream\n',
            "is pure but imports fakepkg.dataplane.upstream",
        ),
        (
            "core/router.py",
            '"""r."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n'
            "    from ..dataplane.upstream import X\n",
            "is pure but imports fakepkg.dataplane.upstream",
        ),
        (
            "dataplane/upstream.py",
            '"""u."""\nimport prometheus_client\n',
            "is data plane but imports prometheus_client",
        ),
        (
            "dataplane/upstream.py",
            '"""u."""\nfrom fakepkg.control import metrics\n',
            "only app and cli reach control/",
        ),
        (
            "dataplane/upstream.py",
            '"""u."""\nimport logging\nlogger = logging.getLogger()\nlogger.info("x")\n',
            "logger.info()",
        ),
        ("dataplane/upstream.py", "x = 1\n", "has no module docstring"),
        ("control/metrics.py", '"""m."""\nimport benchmarks.load\n', "benchmarks/ is never"),
        ("core/router.py", '"""1\n2\n3\n4\n5\n6\n"""\n', "docstring has 6 lines"),
        ("dataplane/big.py", '"""b."""\n' + "x = 1\n" * 450, "has 451 lines (max 450)"),
        (
            "dataplane/big.py",
            '"""b."""\nclass Big:\n' + "    x = 1\n" * 300,
            "Big has 301 lines (max 300)",
        ),
        (
            "dataplane/upstream.py",
            '"""u."""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n'
            "    from fakepkg.dataplane import exchange\n",
            "import cycle: fakepkg.dataplane.exchange -> fakepkg.dataplane.upstream -> "
            "fakepkg.dataplane.exchange",
        ),
    ],
)
def test_a_deliberate_violation_is_caught(tmp_path: Path, rel: str, text: str, expected: str):
    files = {
        "fakepkg/__init__.py": "",
        "fakepkg/app.py": GOOD + "from fakepkg.control import metrics\n",
        "fakepkg/core/__init__.py": "",
        "fakepkg/core/router.py": GOOD + "import hashlib\n",
        "fakepkg/core/config/__init__.py": "",
        "fakepkg/core/config/load.py": GOOD + "import yaml\n",
        "fakepkg/dataplane/__init__.py": "",
        "fakepkg/dataplane/upstream.py": GOOD + "import httptools\nfrom ..core import router\n",
        "fakepkg/dataplane/exchange.py": GOOD + "from fakepkg.dataplane import upstream\n",
        "fakepkg/control/__init__.py": "",
        "fakepkg/control/metrics.py": GOOD + "import prometheus_client\n",
    }
    package = write_tree(tmp_path, files)
    assert violations(package) == []  # the clean fake tree passes
    (package / rel).write_text(text)
    found = violations(package)
    assert any(expected in v for v in found), found


def test_the_architecture_map_lists_every_module() -> None:
    """docs/architecture.md's module tables are written by scripts/architecture.py from the
    docstrings; a module added or removed without rerunning it fails here."""
    import subprocess

    script = ROOT / "scripts" / "architecture.py"
    run = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "")
