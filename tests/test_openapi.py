"""The OpenAPI document of the admin API: a valid OpenAPI 3.1 document (openapi-spec-validator),
exactly the admin app's routes, served at /api/v1/openapi.json and printed by `graygate
openapi`; `graygate schema` prints the config's JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys

from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator
from test_admin import AUTH, TOKEN, Harness

from proxy import __version__
from proxy.control.admin import make_admin_app
from tests.helpers.openapi_check import DOC

METHODS = {"get", "put", "post", "delete", "patch"}


def test_document_is_valid_openapi_3_1():
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC, cls=OpenAPIV31SpecValidator)
    assert DOC["info"]["version"] == __version__


def served_operations(app):
    ops = set()
    for resource in app.router.resources():
        for route in resource:
            # aiohttp answers HEAD for every GET by itself; the document lists the GETs.
            if route.method != "HEAD":
                ops.add((route.method.lower(), resource.canonical))
    return ops


def documented_operations():
    return {
        (method, path)
        for path, item in DOC["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_served_route_is_documented_and_every_documented_path_is_served(tmp_path):
    app = make_admin_app(Harness(tmp_path, with_metrics=True).ctx)
    served, documented = served_operations(app), documented_operations()
    assert served - documented == set(), "served but not in openapi.yaml"
    assert documented - served == set(), "in openapi.yaml but not served"
    assert ("get", "/api/v1/routes/{route}/series") in served


def test_every_operation_has_an_id_and_documents_its_errors():
    ids = []
    for path, item in DOC["paths"].items():
        for method in METHODS & set(item):
            op = item[method]
            ids.append(op["operationId"])
            assert "403" in op["responses"], f"{method} {path}: the Host/Origin guard's 403"
            if path.startswith("/api/v1/"):
                assert "401" in op["responses"], f"{method} {path}: token"
    assert len(ids) == len(set(ids))


async def test_served_at_api_v1_openapi_json_behind_the_token(tmp_path):
    app = make_admin_app(Harness(tmp_path, token=TOKEN).ctx)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/api/v1/openapi.json")).status == 401
        resp = await client.get("/api/v1/openapi.json", headers=AUTH)
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.json() == DOC


def run_command(*args):
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_graygate_openapi_prints_the_document_as_json():
    out = run_command("openapi")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == DOC
    tool = subprocess.run(
        [sys.executable, "-m", "json.tool"], input=out.stdout, capture_output=True, text=True
    )
    assert tool.returncode == 0, tool.stderr


def test_graygate_schema_prints_the_config_json_schema():
    out = run_command("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "routes" in schema["properties"]
