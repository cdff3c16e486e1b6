"""Where the checkout is, and the modules pyproject.toml compiles with mypyc."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def compiled_sources(root: Path = ROOT) -> list[Path]:
    """The sources that pyproject.toml [tool.graygate.mypyc] says to compile, as setup.py
    expands its globs (include minus exclude; package __init__ files are never compiled)."""
    mypyc = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["graygate"]["mypyc"]

    def matches(key: str) -> set[Path]:
        return {p for g in mypyc.get(key, []) for p in root.glob(g)}

    return sorted(p for p in matches("include") - matches("exclude") if p.name != "__init__.py")


def module_of(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)
