"""Which build runs: the mypyc-compiled modules or pure Python. An extension of proxy is
loaded only when _compiled.json (written by setup.py) lists it, every source hash in it
matches the .py files here and GRAYGATE_NO_EXTENSIONS is unset; otherwise a finder loads
the .py beside it, so a stale extension never shadows an edited source.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = Path(__file__).resolve().parent
MANIFEST = "_compiled.json"
REBUILD = "rebuild with make (or pip install -e .)"


@dataclass(frozen=True)
class Build:
    compiled: bool
    modules: tuple[str, ...]  # the compiled modules in use; empty for pure python
    extensions: frozenset[str]  # their files, relative to the package; what the finder allows
    note: str = ""  # why this build is pure, when something says why
    stale: bool = False  # a compiled build is installed, but its sources changed since

    def describe(self) -> str:
        """What `graygate --version` says; the start-up log adds the note."""
        return "compiled: mypyc" if self.compiled else "pure python"


def disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("GRAYGATE_NO_EXTENSIONS", "") not in ("", "0")


def select(package: Path, environ: Mapping[str, str]) -> Build:
    """Reads the manifest of the build installed in package and decides what may load."""
    try:
        manifest: dict[str, Any] = json.loads((package / MANIFEST).read_text())
    except FileNotFoundError:
        return Build(False, (), frozenset())
    except (OSError, ValueError) as exc:
        return Build(False, (), frozenset(), f"{MANIFEST} is unreadable ({exc})", stale=True)
    if manifest.get("compiler") != "mypyc":
        return Build(False, (), frozenset(), str(manifest.get("reason", "")))
    if disabled(environ):
        return Build(False, (), frozenset(), "GRAYGATE_NO_EXTENSIONS is set")
    for rel, digest in manifest["sources"].items():
        try:
            current = hashlib.sha256((package / rel).read_bytes()).hexdigest()
        except OSError:
            current = ""
        if current != digest:
            note = f"proxy/{rel} changed since the build; {REBUILD}"
            return Build(False, (), frozenset(), note, stale=True)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for rel in manifest["extensions"]:
        if not rel.endswith(suffixes) or not (package / rel).exists():
            note = f"proxy/{rel} is missing; {REBUILD}"
            return Build(False, (), frozenset(), note, stale=True)
    return Build(True, tuple(manifest["modules"]), frozenset(manifest["extensions"]))


class SourceUnlessVouched:
    """Meta path finder for the package's submodules: an extension that the build does not
    vouch for is replaced by the .py beside it (a compiled group loads whole or not at all)."""

    def __init__(self, package_name: str, package: Path, allowed: frozenset[str]) -> None:
        self.prefix = package_name + "."
        self.package = package
        self.allowed = allowed

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith(self.prefix):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        origin = Path(str(spec.origin))
        try:
            rel = origin.resolve().relative_to(self.package).as_posix()
        except ValueError:
            rel = ""
        if rel in self.allowed:
            return spec
        source = origin.with_name(fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, source) if source.exists() else None


def install(package_name: str = "proxy") -> Build:
    """Called once from proxy/__init__.py, before any submodule loads."""
    build = select(PACKAGE, os.environ)
    if not any(isinstance(f, SourceUnlessVouched) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceUnlessVouched(package_name, PACKAGE, build.extensions))
    return build


BUILD = install()
