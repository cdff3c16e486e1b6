"""proxy/build.py and setup.py: which build runs, the guard that the expected one does
(GRAYGATE_EXPECT_COMPILED=1 in `make test`, 0 in `make test-pure`), and that an extension
is never used for a source edited since the build."""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

import proxy
from proxy.build import BUILD, MANIFEST, Build, SourceUnlessVouched, select
from proxy.cli import main
from tests.helpers import ROOT, compiled_sources, module_of

EXPECT = os.environ.get("GRAYGATE_EXPECT_COMPILED")
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
INSTALLED = Path(proxy.__file__).resolve().parent


def loaded_compiled(name: str) -> bool:
    module = __import__(name, fromlist=["_"])
    # Not __file__: mypyc sets it wrongly for modules its group imported natively.
    return isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader)


@pytest.mark.skipif(EXPECT is None, reason="GRAYGATE_EXPECT_COMPILED is not set")
def test_the_expected_build_runs() -> None:
    expected = [module_of(p) for p in compiled_sources()]
    assert expected, "pyproject.toml [tool.graygate.mypyc] matches no module"
    loaded = {name: loaded_compiled(name) for name in expected}
    if EXPECT == "1":
        assert BUILD.compiled, f"the pure build runs: {BUILD.note or 'installed pure'}"
        assert [n for n, c in loaded.items() if not c] == [], "imported from .py"
        assert sorted(BUILD.modules) == sorted(expected)
    else:
        assert not BUILD.compiled, "the compiled build runs"
        assert [n for n, c in loaded.items() if c] == [], "imported compiled"


def test_interpreted_modules_stay_interpreted() -> None:
    # config and state validate with our own errors, which compiled code would not raise.
    config = sorted((ROOT / "proxy" / "core" / "config").glob("*.py"))
    assert config, "proxy/core/config/ has no module"
    for path in config:
        assert not loaded_compiled(f"proxy.core.config.{path.stem}"), path.name
    assert not loaded_compiled("proxy.core.state")


def test_version_says_which_build(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    out = capsys.readouterr().out.strip()
    assert out == f"graygate {proxy.__version__} ({BUILD.describe()})"
    assert out.endswith("(compiled: mypyc)" if BUILD.compiled else "(pure python)")


def test_mypy_pinned_once_for_the_build_and_the_checks() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = [r for r in pyproject["build-system"]["requires"] if r.startswith("mypy")]
    dev = [r for r in pyproject["project"]["optional-dependencies"]["dev"] if r.startswith("mypy")]
    assert len(build) == 1 and build[0].startswith("mypy==")
    assert dev == build


def test_the_build_has_every_typed_package_the_compiled_modules_import() -> None:
    # Missing from the isolated build, a package is Any to mypyc (no-any-return under strict,
    # or unchecked values), though `make check` saw its types: the compiled code would not
    # be what was checked.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = {re.split(r"[=<>\[ ]", r)[0].lower() for r in pyproject["build-system"]["requires"]}
    imported = set()
    for path in compiled_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"proxy", "__future__"}
    assert third_party and third_party <= requires


def test_globs_pick_up_a_module_added_to_the_data_plane(tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    for rel in ["dataplane/__init__.py", "dataplane/attempt.py", "dataplane/gateway.py"]:
        (tmp_path / "proxy" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "proxy" / rel).write_text("")
    (tmp_path / "proxy" / "core").mkdir()
    (tmp_path / "proxy" / "core" / "state.py").write_text("")
    assert [module_of(p, tmp_path) for p in compiled_sources(tmp_path)] == [
        "proxy.dataplane.attempt",
        "proxy.dataplane.gateway",
    ]
    excluding = re.sub(
        r"(?ms)^exclude = \[.*?\]$", 'exclude = ["proxy/dataplane/gateway.py"]', pyproject
    )
    assert excluding != pyproject
    (tmp_path / "pyproject.toml").write_text(excluding)
    assert [module_of(p, tmp_path) for p in compiled_sources(tmp_path)] == [
        "proxy.dataplane.attempt"
    ]


def load_setup_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("graygate_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def test_setup_py_expands_the_globs_as_the_tests_do() -> None:
    pytest.importorskip("setuptools")
    expected = [p.relative_to(ROOT).as_posix() for p in compiled_sources()]
    assert load_setup_py().compile_targets() == expected


def test_a_compiler_that_fails_leaves_a_pure_build_that_says_why(tmp_path: Path) -> None:
    # The second line of defence, after the compiler probe: build_ext itself fails.
    setuptools = pytest.importorskip("setuptools")
    broken = tmp_path / "broken.c"
    broken.write_text("#error this compiler fails\n")
    lib = tmp_path / "lib"
    (lib / "proxy" / "dataplane").mkdir(parents=True)
    (lib / "proxy" / "dataplane" / f"old{SUFFIX}").write_bytes(b"left by an earlier build")
    ext = setuptools.Extension("proxy.broken", [str(broken)])
    cmd = load_setup_py().BuildExt(setuptools.Distribution({"name": "g", "ext_modules": [ext]}))
    cmd.build_lib, cmd.build_temp = str(lib), str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    manifest = json.loads((lib / "proxy" / MANIFEST).read_text())
    assert manifest["compiler"] is None and manifest["reason"].startswith("compiling failed")
    assert list(lib.rglob(f"*{SUFFIX}")) == []
    assert select(lib / "proxy", {}) == Build(False, (), frozenset(), manifest["reason"])


# -- select(): the manifest against the sources --------------------------------------------------


def fake_build(root: Path, compiled: bool = True) -> Path:
    package = root / "pkg"
    (package / "dataplane").mkdir(parents=True)
    (package / "dataplane" / "hot.py").write_text("X = 1\n")
    (package / "dataplane" / f"hot{SUFFIX}").write_bytes(b"not really an extension")
    manifest = {
        "compiler": "mypyc" if compiled else None,
        "reason": "" if compiled else "no C compiler",
        "modules": ["pkg.dataplane.hot"],
        "extensions": [f"dataplane/hot{SUFFIX}"],
        "sources": {"dataplane/hot.py": hashlib.sha256(b"X = 1\n").hexdigest()},
    }
    (package / MANIFEST).write_text(json.dumps(manifest))
    return package


def test_a_build_whose_sources_match_is_compiled(tmp_path: Path) -> None:
    build = select(fake_build(tmp_path), {})
    assert build == Build(True, ("pkg.dataplane.hot",), frozenset({f"dataplane/hot{SUFFIX}"}))
    assert build.describe() == "compiled: mypyc"


def test_an_edited_source_makes_the_whole_build_pure(tmp_path: Path) -> None:
    package = fake_build(tmp_path)
    (package / "dataplane" / "hot.py").write_text("X = 2\n")
    build = select(package, {})
    assert not build.compiled and build.stale and build.extensions == frozenset()
    assert "proxy/dataplane/hot.py changed since the build" in build.note
    assert build.describe() == "pure python"


def test_a_missing_extension_makes_the_build_pure(tmp_path: Path) -> None:
    package = fake_build(tmp_path)
    (package / "dataplane" / f"hot{SUFFIX}").unlink()
    build = select(package, {})
    assert not build.compiled and build.stale and "is missing" in build.note


@pytest.mark.parametrize(("value", "compiled"), [("1", False), ("yes", False), ("0", True)])
def test_no_extensions_variable_forces_pure(tmp_path: Path, value: str, compiled: bool) -> None:
    build = select(fake_build(tmp_path), {"GRAYGATE_NO_EXTENSIONS": value})
    assert build.compiled is compiled and not build.stale


def test_a_pure_install_says_why(tmp_path: Path) -> None:
    assert select(fake_build(tmp_path, compiled=False), {}) == Build(
        False, (), frozenset(), "no C compiler"
    )
    assert select(tmp_path, {}) == Build(False, (), frozenset())  # no manifest at all


# -- the finder ----------------------------------------------------------------------------------


def test_finder_loads_the_source_beside_an_extension_it_does_not_vouch_for(tmp_path: Path) -> None:
    package = fake_build(tmp_path)
    path = [str(package / "dataplane")]
    refused = SourceUnlessVouched("pkg", package, frozenset())
    spec = refused.find_spec("pkg.dataplane.hot", path)
    assert spec is not None and spec.origin == str(package / "dataplane" / "hot.py")
    vouched = SourceUnlessVouched("pkg", package, frozenset({f"dataplane/hot{SUFFIX}"}))
    spec = vouched.find_spec("pkg.dataplane.hot", path)
    assert spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)
    assert refused.find_spec("other.hot", path) is None  # not ours: the usual finders decide


def run_python(code: str, cwd: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GRAYGATE_NO_EXTENSIONS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**environ, "PYTHONPATH": str(cwd), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


PROBE = """
import importlib.machinery as m, proxy, proxy.build as b, proxy.dataplane.downstream as d
assert proxy.__file__.startswith({root!r}), proxy.__file__
print(b.BUILD.compiled, isinstance(d.__loader__, m.ExtensionFileLoader), b.BUILD.stale)
"""


@pytest.mark.skipif(not BUILD.compiled, reason="needs the compiled build")
def test_an_edit_after_the_build_is_never_shadowed_by_the_extension(tmp_path: Path) -> None:
    # A copy of the installed compiled package: as built, then with one compiled module
    # edited, then with the variable set. The real import system decides in a child.
    shutil.copytree(INSTALLED, tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    probe = PROBE.format(root=str(tmp_path))
    assert run_python(probe, tmp_path) == "True True False"
    assert run_python(probe, tmp_path, GRAYGATE_NO_EXTENSIONS="1") == "False False False"
    edited = tmp_path / "proxy" / "dataplane" / "upstream.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    assert run_python(probe, tmp_path) == "False False True"
