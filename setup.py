"""Build script: the hot modules compiled with mypyc, or a pure-Python build.

Compiled when a C compiler can build a Python extension here and GRAYGATE_NO_EXTENSIONS is
unset; otherwise, or when compiling fails, pure Python. The build records a hash of every
source the compiled code was checked against (proxy/_compiled.json); proxy/build.py loads
the .py files instead of the extensions when one differs, so an edit is never shadowed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MYPYC: dict[str, list[str]] = PYPROJECT["tool"]["graygate"]["mypyc"]  # globs, from ROOT
GROUP = "proxy.compiled"  # mypyc's shared library: proxy/compiled__mypyc.*.so
MANIFEST = "_compiled.json"
PURE_REASON = ["not compiled"]  # set by ext_modules(), recorded by BuildPy
COMMANDS_THAT_COMPILE = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install"}


def compile_targets(root: Path = ROOT) -> list[str]:
    """The source files to compile, relative to root, sorted: what include matches and
    exclude does not, never a package __init__ (nothing to gain; packages stay packages)."""

    def matches(key: str) -> set[str]:
        found = (Path(p) for g in MYPYC.get(key, []) for p in glob.glob(str(root / g)))
        return {p.relative_to(root).as_posix() for p in found}

    targets = matches("include") - matches("exclude")
    return sorted(p for p in targets if not p.endswith("/__init__.py"))


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def extensions_disabled() -> bool:
    return os.environ.get("GRAYGATE_NO_EXTENSIONS", "") not in ("", "0")


def compiler_works() -> str | None:
    """None when a C compiler builds and links a Python extension here; else why not."""
    # distutils is setuptools' copy here (Python 3.12 has none of its own).
    from distutils.ccompiler import new_compiler
    from distutils.errors import CCompilerError, DistutilsError
    from distutils.sysconfig import customize_compiler

    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h)"
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text(
            "#include <Python.h>\nint graygate_probe(void) { return Py_IsNone(Py_None); }\n"
        )
        try:
            objects = compiler.compile([str(src)], output_dir=tmp, include_dirs=[include])
            compiler.link_shared_object(objects, str(Path(tmp, "probe.so")))
        except (CCompilerError, DistutilsError, OSError):
            return f"no working C compiler ({compiler.compiler_so[0]} cannot build an extension)"
    return None


def source_hashes(root: Path, targets: list[str]) -> dict[str, str]:
    """SHA-256 of every package source mypy read for the compiled modules: they and every
    proxy module they import, transitively (compiled code trusts those modules' types)."""
    import ast

    package = root / "proxy"
    seen: set[Path] = set()
    todo = [root / t for t in targets]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        parts = list(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = parts[: len(parts) - node.level] if node.level else []
                mod = ".".join([*base, *([node.module] if node.module else [])])
                names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            for name in names:
                if name.split(".")[0] != "proxy":
                    continue
                rel = Path(*name.split("."))
                for parent in [rel, *rel.parents][:-1]:  # proxy.a.b: a/b.py, a/b/, a.py, ...
                    todo.append(root / parent.with_suffix(".py"))
                    todo.append(root / parent / "__init__.py")
    return {
        p.relative_to(package).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(seen)
    }


class BuildPy(build_py):
    """Clears what an earlier build left behind (an extension or manifest of a compiled
    build must not ride along in a pure one); a pure build records why it is pure."""

    def run(self) -> None:
        super().run()
        build_ext_cmd = self.get_finalized_command("build_ext")
        keep = {
            Path(build_ext_cmd.get_ext_filename(ext.name)).relative_to("proxy").as_posix()
            for ext in self.distribution.ext_modules or []
        }
        for directory in package_dirs(self.build_lib, self.editable_mode):
            prune(directory, keep)
            if not keep:
                write_manifest(directory, {"compiler": None, "reason": PURE_REASON[0]})


class BuildExt(build_ext):
    """Falls back to the pure build when the compiler fails, and writes the manifest
    beside the extensions when it succeeds."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a compiler or linker failure, whatever its class
            reason = f"compiling failed ({exc})"
            print(f"graygate: {reason}: pure Python build", file=sys.stderr)
            for directory in package_dirs(self.build_lib, self.inplace):
                prune(directory)
                write_manifest(directory, {"compiler": None, "reason": reason})
            self.extensions = []
            return
        targets = compile_targets()
        manifest = {
            "compiler": "mypyc",
            "mypy": mypy_version(),
            "modules": [module_name(t) for t in targets],
            "extensions": sorted(
                Path(self.get_ext_filename(ext.name)).relative_to("proxy").as_posix()
                for ext in self.extensions
            ),
            "sources": source_hashes(ROOT, targets),
        }
        for directory in package_dirs(self.build_lib, self.inplace):
            write_manifest(directory, manifest)


def package_dirs(build_lib: str, editable: bool) -> list[Path]:
    """Where the build puts the package: build_lib, and the source tree when editable."""
    return [Path(build_lib, "proxy"), *([ROOT / "proxy"] if editable else [])]


def prune(directory: Path, keep: set[str] | None = None) -> None:
    """Removes the manifest and every extension under directory but those to keep."""
    for stale in [*directory.glob("**/*.so"), *directory.glob("**/*.pyd"), directory / MANIFEST]:
        if stale.relative_to(directory).as_posix() not in (keep or set()):
            stale.unlink(missing_ok=True)


def write_manifest(directory: Path, manifest: Mapping[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def mypy_version() -> str:
    from mypy.version import __version__

    return str(__version__)


def ext_modules() -> list[object]:
    if not COMMANDS_THAT_COMPILE & set(sys.argv[1:]):
        return []  # metadata and sdist need no compiling
    why_not = "GRAYGATE_NO_EXTENSIONS is set" if extensions_disabled() else compiler_works()
    if why_not is not None:
        PURE_REASON[0] = why_not
        print(f"graygate: {why_not}: pure Python build", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    targets = compile_targets()
    print(f"graygate: compiling {len(targets)} modules with mypyc", file=sys.stderr)
    # A cache of its own: the one of `make check` was made with other packages installed.
    options = ["--cache-dir", "build/mypyc/cache"]
    try:
        return list(mypycify([*options, *targets], group_name=GROUP, target_dir="build/mypyc"))
    except (SystemExit, Exception) as exc:  # mypy/mypyc refused a module: say so, stay pure
        PURE_REASON[0] = f"mypyc failed ({exc})"
        print(f"graygate: {PURE_REASON[0]}: pure Python build", file=sys.stderr)
        return []


if __name__ == "__main__":
    os.chdir(ROOT)  # mypy reads [tool.mypy] from pyproject.toml; targets are relative
    setup(ext_modules=ext_modules(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
