"""The admin API's OpenAPI 3.1 document: openapi.yaml beside this module (package data),
with the package version filled in. Served at GET /api/v1/openapi.json and printed by
`graygate openapi`; the admin tests check every answer against it.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

from proxy import __version__

SOURCE = Path(__file__).with_name("openapi.yaml")


@functools.cache
def _load() -> dict[str, Any]:
    doc = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{SOURCE}: not a mapping")
    doc["info"]["version"] = __version__
    # Through JSON once: the document served is exactly what a JSON client would parse.
    loaded: dict[str, Any] = json.loads(json.dumps(doc))
    return loaded


def document() -> dict[str, Any]:
    """A fresh copy, so no caller can change what the next one gets."""
    return copy.deepcopy(_load())


def text() -> str:
    return json.dumps(_load(), indent=2) + "\n"
