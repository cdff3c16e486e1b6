"""Rewrite the module tables of docs/architecture.md from the modules' own docstrings.

`python scripts/architecture.py` rewrites the file; `--check` exits 1 when a module is
missing from the tables or a listed one no longer exists (tests/test_layout.py runs it).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SECTIONS = {
    "### Top level": ("proxy", False),
    "### `proxy/core/` (pure)": ("proxy/core", True),
    "### `proxy/dataplane/`": ("proxy/dataplane", True),
    "### `proxy/control/`": ("proxy/control", True),
}
RULE = "|---|---|---|\n"


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=\.)\s+(?=[A-Z`])", text)
    return text if m is None else text[: m.start()]


def modules(folder: str, recursive: bool) -> list[Path]:
    base = ROOT / folder
    found = base.rglob("*.py") if recursive else base.glob("*.py")
    return sorted(p for p in found if p.name != "__init__.py")


def row(path: Path) -> str:
    src = path.read_text()
    doc = ast.get_docstring(ast.parse(src)) or ""
    rel = path.relative_to(ROOT).as_posix()
    return f"| [`{rel}`](../{rel}) | {len(src.splitlines())} | {first_sentence(doc)} |"


def tables(doc: str) -> dict[str, tuple[int, int]]:
    """Each section's table body as (start, end) offsets in `doc`."""
    spans = {}
    for title in SECTIONS:
        start = doc.index(RULE, doc.index(title)) + len(RULE)
        end = start
        for line in doc[start:].splitlines(keepends=True):
            if not line.startswith("| ["):
                break
            end += len(line)
        spans[title] = (start, end)
    return spans


def rewritten(doc: str) -> str:
    spans = tables(doc)
    for title in reversed(list(SECTIONS)):  # from the end: earlier offsets stay valid
        start, end = spans[title]
        body = "".join(row(p) + "\n" for p in modules(*SECTIONS[title]))
        doc = doc[:start] + body + doc[end:]
    return doc


def listed(doc: str) -> set[str]:
    return set(re.findall(r"^\| \[`([^`]+)`\]", doc, flags=re.M))


def main(argv: list[str]) -> int:
    doc = DOC.read_text()
    if "--check" in argv:
        actual = {p.relative_to(ROOT).as_posix() for s in SECTIONS.values() for p in modules(*s)}
        missing, stale = actual - listed(doc), listed(doc) - actual
        for name in sorted(missing):
            print(f"docs/architecture.md does not list {name}: run scripts/architecture.py")
        for name in sorted(stale):
            print(f"docs/architecture.md lists {name}, which no longer exists")
        return 1 if missing or stale else 0
    DOC.write_text(rewritten(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
