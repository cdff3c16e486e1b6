"""Log output (proxy/control/logs.py): the JSON formatter's fields, and the real `graygate`
command with `--log-format json` and the access log on: every line one JSON object, the
access lines and the state changes with their structured fields."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.control.logs import TEXT_FORMAT, JsonFormatter
from tests.helpers import free_port, route_config, wait_port

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(msg: str, args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("proxy.x", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_have_the_fixed_fields_and_the_structured_ones():
    line = JsonFormatter().format(
        record("route %s: %s", ("shop", "weights"), route="shop", figures={"p": float("nan")})
    )
    out = json.loads(line)
    assert TIME.fullmatch(out.pop("time"))
    assert out == {
        "level": "INFO",
        "logger": "proxy.x",
        "message": "route shop: weights",
        "route": "shop",
        "figures": {"p": None},  # strict JSON
    }


def test_a_mapping_argument_becomes_fields_and_still_formats_the_text_line():
    args = {"client": "10.0.0.1", "status": 200, "route": "shop"}
    msg = "%(client)s %(status)d route=%(route)s"
    out = json.loads(JsonFormatter().format(record(msg, args)))
    assert out["message"] == "10.0.0.1 200 route=shop"
    assert (out["client"], out["status"], out["route"]) == ("10.0.0.1", 200, "shop")
    text = logging.Formatter(TEXT_FORMAT).format(record(msg, args))
    assert text.endswith("INFO proxy.x: 10.0.0.1 200 route=shop")


def test_exceptions_are_one_field_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("proxy", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


async def test_serve_with_json_logs_and_the_access_log(tmp_path: Path, upstreams, graygate_process):
    blue, green = await upstreams("blue"), await upstreams("green")
    port, admin = free_port(), free_port()
    conf = tmp_path / "graygate.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "state": {"path": str(tmp_path / "state.json")},
                "access_log": True,
                "routes": [route_config(blue.url, green.url)],
            }
        )
    )
    proc = graygate_process("--log-format", "json", "serve", "-c", str(conf))
    wait_port(admin)
    async with aiohttp.ClientSession() as s:
        for path in ("/a", "/b?q=1"):
            async with s.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 200
        url = f"http://127.0.0.1:{admin}/api/v1/routes/shop/weights"
        async with s.put(url, json={"blue": 70, "green": 30}) as resp:
            assert resp.status == 200
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(15) == 0

    lines = [json.loads(line) for line in proc.output().splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    access = [line for line in lines if line["logger"] == "graygate.access"]
    assert [a["path"] for a in access] == ["/a", "/b"]  # never the query: it may hold secrets
    assert all(a["route"] == "shop" and a["status"] == 200 for a in access)
    assert access[0]["version"] == "blue" and access[0]["method"] == "GET"
    assert access[0]["reason"] == "weight" and access[0]["duration_ms"] >= 0
    change = next(line for line in lines if line.get("action") == "weights")
    assert change["route"] == "shop" and change["level"] == "INFO"
    assert change["state"]["weights"] == {"blue": 70, "green": 30}
    assert change["revision"] == change["state"]["revision"] and change["actor"] == "127.0.0.1"
    assert any(line["message"] == "graygate stopped" for line in lines)
