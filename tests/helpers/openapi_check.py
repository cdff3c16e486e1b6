"""Checks admin answers against the OpenAPI document: a middleware put outermost on an admin
app under test validates every answer of a documented operation (status documented, media
type documented, JSON body valid against the operation's response schema) and keeps the
mismatches, which the fixture asserts empty at teardown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy.control import openapi

DOC = openapi.document()
BASE = "urn:graygate:admin-openapi"
REGISTRY: Registry[Any] = Registry().with_resource(
    BASE, Resource.from_contents(DOC, default_specification=DRAFT202012)
)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _follow(pointer: str) -> tuple[str, Any]:
    """The object at a JSON pointer of DOC, following $refs; returns its final pointer."""
    node: Any = DOC
    for part in pointer.lstrip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"].removeprefix("#")
        return _follow(pointer)
    return pointer, node


def response_schema(method: str, template: str, status: int, media: str) -> str:
    """The JSON pointer of the schema of this answer; AssertionError when undocumented."""
    op_pointer = f"/paths/{_escape(template)}/{method.lower()}"
    try:
        _, op = _follow(op_pointer)
    except KeyError:
        raise AssertionError(f"{method} {template} is not in the OpenAPI document") from None
    responses = op["responses"]
    key = str(status) if str(status) in responses else "default"
    if key not in responses:
        raise AssertionError(f"{method} {template}: status {status} is not documented")
    pointer, response = _follow(f"{op_pointer}/responses/{key}")
    content = response.get("content", {})
    if media not in content:
        raise AssertionError(
            f"{method} {template} {status}: media type {media!r} is not documented "
            f"(documented: {', '.join(content) or 'none'})"
        )
    return f"{pointer}/content/{_escape(media)}/schema"


def validate(method: str, template: str, status: int, media: str, body: str) -> list[str]:
    """Every mismatch of one answer, as sentences; [] when it matches the document."""
    try:
        pointer = response_schema(method, template, status, media)
    except AssertionError as exc:
        return [str(exc)]
    if media != "application/json":
        return []
    try:
        data = json.loads(body)
    except ValueError as exc:
        return [f"{method} {template} {status}: body is not JSON: {exc}"]
    validator = Draft202012Validator({"$ref": f"{BASE}#{pointer}"}, registry=REGISTRY)
    return [
        f"{method} {template} {status}: {'/'.join(map(str, e.absolute_path)) or '(body)'}: "
        f"{e.message}"
        for e in validator.iter_errors(data)
    ]


@dataclass
class ResponseChecker:
    failures: list[str] = field(default_factory=list)
    checked: int = 0

    def install(self, app: web.Application) -> web.Application:
        app.middlewares.insert(0, self._middleware)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        resource = request.match_info.route.resource
        # No resource: an unknown path or a wrong method, which no operation describes.
        if resource is None or request.method == "HEAD":
            return response
        if not isinstance(response, web.Response) or response.text is None:
            self.failures.append(f"{request.method} {request.path}: not a plain response")
            return response
        self.checked += 1
        self.failures += validate(
            request.method,
            resource.canonical,
            response.status,
            response.content_type,
            response.text,
        )
        return response

    def assert_clean(self) -> None:
        assert not self.failures, "answers that disagree with the OpenAPI document:\n" + (
            "\n".join(self.failures)
        )
