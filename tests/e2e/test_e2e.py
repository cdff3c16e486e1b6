"""End-to-end tests of the real `graygate` command (`python -m proxy ...` in a subprocess):
check, serve, signals, restart with persisted state, reload, graceful drain, memory under a
large streamed response, and the demo. Upstreams are real aiohttp apps in this process (or
the demo's own sample upstreams); clients are curl and aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import __version__
from proxy.build import BUILD
from tests.helpers import ROOT, ConfigFile, Process, free_port, route_config, split_head

# conftest's graygate_process leaves its log file handle to the garbage collector.
MIB = 1024 * 1024
TIMEOUTS = {"connect": "500ms", "read": "1s", "request": "3s"}


# ---- helpers -------------------------------------------------------------------------------


class Cfg(ConfigFile):
    """A config file for `graygate serve` on free ports, with this file's TIMEOUTS."""

    def __init__(self, tmp_path: Path, routes: list[dict[str, Any]], **top: Any) -> None:
        super().__init__(tmp_path, routes, **{"timeouts": TIMEOUTS, **top})


def unused_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def run_cli(tmp_path: Path, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a short-lived graygate command with stdout and stderr kept apart."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_cli_async(tmp_path: Path, *args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """Same as run_cli, without blocking the loop (in-process upstreams must keep answering)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def curl(*args: str, timeout: float = 30.0) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-s",
        "--max-time",
        str(int(timeout)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout + 5)
    assert proc.returncode is not None
    return proc.returncode, out


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    line, fields = split_head(head)
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in fields}
    return int(line.split()[1]), headers, body


async def curl_get(url: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    rc, out = await curl("-i", *extra, url, timeout=10)
    assert rc == 0, f"curl {url} failed with exit code {rc}: {out!r}"
    return parse_response(out)


async def wait_up(p: Process, *ports: int, timeout: float = 15.0) -> None:
    """Until every port accepts connections; fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if p.proc.poll() is not None:
                pytest.fail(f"graygate exited with {p.proc.returncode}:\n{p.output()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nothing listens on {port} after {timeout}s:\n{p.output()}")
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            break


async def wait_exit(p: Process, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while p.proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"graygate still running after {timeout}s:\n{p.output()}")
        await asyncio.sleep(0.05)
    return p.proc.returncode


async def wait_log(p: Process, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in p.output():
        if time.monotonic() > deadline:
            pytest.fail(f"{needle!r} not in the log after {timeout}s:\n{p.output()}")
        await asyncio.sleep(0.05)
    return p.output()


async def port_refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def admin_json(method: str, url: str, body: Any = None, expect: int = 200) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as r:
        data = await r.json()
        assert r.status == expect, data
        return data


def named_app(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name} {request.path_qs}\n")

    return handler


# ---- graygate check ------------------------------------------------------------------------


def test_check_good_config_prints_routes(tmp_path: Path) -> None:
    cfg = Cfg(
        tmp_path,
        [
            route_config(
                "http://127.0.0.1:9001", "http://127.0.0.1:9002", weights={"blue": 60, "green": 40}
            )
        ],
    )
    r = run_cli(tmp_path, "check", "-c", cfg.path.name)
    assert r.returncode == 0, r.stderr
    assert "route shop" in r.stdout
    assert "http://127.0.0.1:9001" in r.stdout and "http://127.0.0.1:9002" in r.stdout
    assert "blue=60 green=40" in r.stdout
    assert "valid" in r.stdout


@pytest.mark.parametrize(
    ("edit", "dotted"),
    [
        ({"weights": {"blue": 60, "green": 30}}, "routes[0].weights"),
        ({"bogus_key": 1}, "routes[0].bogus_key"),
    ],
    ids=["weights-sum-90", "unknown-key"],
)
def test_check_bad_config_exits_2_with_dotted_path(
    tmp_path: Path, edit: dict[str, Any], dotted: str
) -> None:
    cfg = Cfg(tmp_path, [route_config("http://127.0.0.1:9001", "http://127.0.0.1:9002", **edit)])
    r = run_cli(tmp_path, "check", "-c", cfg.path.name)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert dotted in r.stderr
    assert "valid" not in r.stdout


async def test_serve_bad_config_exits_2_and_binds_nothing(tmp_path: Path, graygate_process) -> None:
    cfg = Cfg(
        tmp_path,
        [route_config(unused_endpoint(), unused_endpoint(), weights={"blue": 60, "green": 30})],
    )
    p = graygate_process("serve", "-c", cfg.path.name)
    assert await wait_exit(p) == 2
    assert "routes[0].weights" in p.output()
    assert await port_refuses(cfg.port)
    assert await port_refuses(cfg.admin_port)


# ---- serve, signals ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_proxies_and_exits_0_on_signal(
    tmp_path: Path, graygate_process, upstreams, sig: signal.Signals
) -> None:
    blue = await upstreams("blue", named_app("blue"))
    green = await upstreams("green", named_app("green"))
    cfg = Cfg(tmp_path, [route_config(blue.url, green.url, weights={"blue": 50, "green": 50})])
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)
    log = await wait_log(p, "serving on")
    assert f"graygate {__version__} ({BUILD.describe()})" in log  # which build runs
    assert f"127.0.0.1:{cfg.port}" in log
    assert f"127.0.0.1:{cfg.admin_port}" in log

    for _ in range(10):
        status, headers, body = await curl_get(cfg.url + "/hello?x=1")
        assert status == 200
        version = headers.get("x-graygate-version")
        assert version in ("blue", "green"), headers
        assert body == f"hello from {version} /hello?x=1\n".encode()
    assert len(blue.requests) + len(green.requests) == 10

    p.proc.send_signal(sig)
    assert await wait_exit(p) == 0, p.output()
    assert await port_refuses(cfg.port)


# ---- state across restarts -----------------------------------------------------------------


async def test_restart_keeps_weights_and_revision(tmp_path: Path, graygate_process) -> None:
    cfg = Cfg(tmp_path, [route_config(unused_endpoint(), unused_endpoint())])
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)
    put = await admin_json(
        "PUT", cfg.admin_url + "/api/v1/routes/shop/weights", {"blue": 30, "green": 70}
    )
    assert put["state"]["weights"] == {"blue": 30, "green": 70}
    revision = put["state"]["revision"]
    p.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(p) == 0, p.output()

    p2 = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p2, cfg.port, cfg.admin_port)
    got = await admin_json("GET", cfg.admin_url + "/api/v1/routes/shop")
    assert got["state"]["weights"] == {"blue": 30, "green": 70}
    assert got["state"]["revision"] == revision
    assert got["revision"] == revision


async def test_corrupt_state_file_refuses_start_until_reset(
    tmp_path: Path, graygate_process
) -> None:
    cfg = Cfg(
        tmp_path,
        [route_config(unused_endpoint(), unused_endpoint(), weights={"blue": 80, "green": 20})],
    )
    cfg.state_path.write_bytes(b"\x00{garbage, not json]")
    p = graygate_process("serve", "-c", cfg.path.name)
    assert await wait_exit(p) == 2
    out = p.output()
    assert str(cfg.state_path) in out
    assert "--reset-state" in out
    assert await port_refuses(cfg.port)

    p2 = graygate_process("serve", "-c", cfg.path.name, "--reset-state")
    await wait_up(p2, cfg.port, cfg.admin_port)
    got = await admin_json("GET", cfg.admin_url + "/api/v1/routes/shop")
    assert got["state"]["weights"] == {"blue": 80, "green": 20}
    p2.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(p2) == 0, p2.output()
    saved = json.loads(cfg.state_path.read_text())
    assert saved["routes"]["shop"]["weights"] == {"blue": 80, "green": 20}


async def test_admin_beyond_loopback_without_token_refuses_to_start(
    tmp_path: Path, graygate_process
) -> None:
    cfg = Cfg(tmp_path, [route_config(unused_endpoint())])
    cfg.data["admin"] = {"listen": f"0.0.0.0:{cfg.admin_port}"}
    cfg.write()
    p = graygate_process("serve", "-c", cfg.path.name)
    assert await wait_exit(p) != 0
    assert p.proc.returncode == 2
    out = p.output()
    assert "admin.listen" in out
    assert "token" in out  # says how to fix it
    assert await port_refuses(cfg.port)
    assert await port_refuses(cfg.admin_port)


# ---- graceful shutdown ---------------------------------------------------------------------


async def test_sigterm_drains_streaming_response(
    tmp_path: Path, graygate_process, upstreams
) -> None:
    chunks = [b"chunk-%02d|" % i for i in range(12)]

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for chunk in chunks:  # 12 x 200 ms = 2.4 s
            await resp.write(chunk)
            await asyncio.sleep(0.2)
        await resp.write_eof()
        return resp

    blue = await upstreams("blue", slow)
    cfg = Cfg(tmp_path, [route_config(blue.url)], timeouts={**TIMEOUTS, "request": "10s"})
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)

    async with aiohttp.ClientSession() as session:
        got: list[bytes] = []

        async def fetch() -> int:
            async with session.get(cfg.url + "/stream") as r:
                async for data in r.content.iter_any():
                    got.append(data)
                return r.status

        started = time.monotonic()
        task = asyncio.create_task(fetch())
        for _ in range(100):  # the first chunk, however busy the machine: at most 2 s
            if got:
                break
            await asyncio.sleep(0.02)
        assert got, "no streamed bytes after 2 s"
        p.proc.send_signal(signal.SIGTERM)

        # Readiness must go off while the stream is still running.
        ready_off = None
        for _ in range(40):
            try:
                async with session.get(cfg.admin_url + "/readyz") as r:
                    if r.status == 503:
                        ready_off = "503"
                        break
                    assert r.status == 200
            except aiohttp.ClientConnectionError:
                ready_off = "admin closed"
                break
            await asyncio.sleep(0.025)
        assert ready_off is not None, "/readyz kept answering 200 after SIGTERM"
        assert not task.done(), "the stream ended before the drain was observed"

        refused = False
        for _ in range(40):
            if await port_refuses(cfg.port):
                refused = True
                break
            await asyncio.sleep(0.025)
        assert refused, "the data port still accepts new connections while draining"
        assert not task.done()

        status = await asyncio.wait_for(task, 10)
        elapsed = time.monotonic() - started
    assert status == 200
    assert b"".join(got) == b"".join(chunks)
    assert elapsed >= 2.0
    assert await wait_exit(p) == 0, p.output()


# ---- reload --------------------------------------------------------------------------------


async def test_reload_sighup_and_api(tmp_path: Path, graygate_process, upstreams) -> None:
    blue = await upstreams("blue", named_app("blue"))
    green = await upstreams("green", named_app("green"))
    cfg = Cfg(tmp_path, [route_config(blue.url, green.url)])  # blue 100
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)
    status, headers, _ = await curl_get(cfg.url + "/")
    assert (status, headers["x-graygate-version"]) == (200, "blue")
    status, _, _ = await curl_get(cfg.url + "/api/x")
    assert status == 200
    before = await admin_json("GET", cfg.admin_url + "/api/v1/routes/shop")

    # Valid edit: shop's config weights 0/100, and a new route /api (first match wins).
    api = route_config(blue.url, green.url, name="api", weights={"blue": 0, "green": 100})
    api["match"] = {"host": "*", "path_prefix": "/api"}
    shop = route_config(blue.url, green.url, weights={"blue": 0, "green": 100})
    valid = {**cfg.data, "routes": [api, shop]}
    cfg.write(valid)
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while True:
        status, headers, body = await curl_get(cfg.url + "/api/x")
        if headers.get("x-graygate-version") == "green":
            break
        assert time.monotonic() < deadline, f"new route not serving after SIGHUP:\n{p.output()}"
        await asyncio.sleep(0.1)
    assert status == 200 and body == b"hello from green /api/x\n"
    for _ in range(5):
        _, headers, _ = await curl_get(cfg.url + "/api/y")
        assert headers["x-graygate-version"] == "green"
    routes = await admin_json("GET", cfg.admin_url + "/api/v1/routes")
    assert [r["name"] for r in routes["routes"]] == ["api", "shop"]
    # A kept route keeps its running state (docs/admin-api.md, "What wins"); the new config
    # is visible and the revision moves by one.
    after = await admin_json("GET", cfg.admin_url + "/api/v1/routes/shop")
    assert after["config"]["weights"] == {"blue": 0, "green": 100}
    assert after["state"]["weights"] == before["state"]["weights"]
    assert after["revision"] == before["revision"] + 1

    # Invalid edit + SIGHUP: refused, logged, the running config keeps serving.
    bad_api = {**api, "weights": {"blue": 0, "green": 90}}
    cfg.write({**valid, "routes": [bad_api, shop]})
    p.proc.send_signal(signal.SIGHUP)
    log = await wait_log(p, "refused")
    assert "routes[0].weights" in log
    for path in ("/api/z", "/api/w"):
        status, headers, _ = await curl_get(cfg.url + path)
        assert (status, headers["x-graygate-version"]) == (200, "green")
    assert p.proc.poll() is None

    # The same file through the API: 422 with the error, old config stays.
    async with aiohttp.ClientSession() as s, s.post(cfg.admin_url + "/api/v1/reload") as r:
        assert r.status == 422
        err = (await r.json())["error"]
    assert err["code"] == "invalid_config"
    assert err["field"] == "routes[0].weights"
    assert "100" in err["message"]
    status, headers, _ = await curl_get(cfg.url + "/api/q")
    assert (status, headers["x-graygate-version"]) == (200, "green")
    routes = await admin_json("GET", cfg.admin_url + "/api/v1/routes")
    assert [r["name"] for r in routes["routes"]] == ["api", "shop"]
    assert routes["routes"][0]["weights"] == {"blue": 0, "green": 100}

    p.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(p) == 0


# ---- memory under a large response ---------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert m, text
    return int(m.group(1))


async def test_200_mib_response_streams_in_bounded_memory(
    tmp_path: Path, graygate_process, upstreams
) -> None:
    block = bytes(range(256)) * 256  # 64 KiB

    async def big(request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("mib", "200")) * MIB
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(total // len(block)):
            await resp.write(block)
        await resp.write_eof()
        return resp

    blue = await upstreams("blue", big)
    cfg = Cfg(tmp_path, [route_config(blue.url)], timeouts={**TIMEOUTS, "read": "5s"})
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)
    fmt = "%{http_code} %{size_download}"
    rc, out = await curl("-o", "/dev/null", "-w", fmt, cfg.url + "/big?mib=2")
    assert (rc, out.decode()) == (0, f"200 {2 * MIB}")

    rss_before = proc_status_kib(p.proc.pid, "VmRSS")
    rc, out = await curl("-o", "/dev/null", "-w", fmt, cfg.url + "/big?mib=200", timeout=60)
    hwm_after = proc_status_kib(p.proc.pid, "VmHWM")
    assert rc == 0, f"curl exit {rc}"
    assert out.decode() == f"200 {200 * MIB}"
    growth_mib = (hwm_after - rss_before) / 1024
    print(f"proxy VmRSS before {rss_before} kB, VmHWM after {hwm_after} kB")
    assert growth_mib < 50, f"RSS grew by {growth_mib:.1f} MiB for a 200 MiB response"


async def test_slow_reader_of_64_mib_gets_every_byte_in_bounded_memory(
    tmp_path: Path, graygate_process, scripted_upstream
) -> None:
    """A client reading a 64 MiB answer at 256 KB/s for 10 s, with timeouts.read at 1 s:
    nothing is lost so far, the upstream is held back (never cut, never done), and the
    proxy's memory does not grow with the answer."""
    body = random.Random(64).randbytes(64 * MIB)
    sent = {"bytes": 0}

    async def script(up, reader, writer) -> None:
        while (head := await up.read_head(reader)) is not None:
            payload = body if b" /big " in head else b"warm"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
            for at in range(0, len(payload), 256 * 1024):
                writer.write(payload[at : at + 256 * 1024])
                await writer.drain()
                sent["bytes"] = min(at + 256 * 1024, len(payload))

    up = await scripted_upstream(script)
    cfg = Cfg(tmp_path, [route_config(up.url)])  # TIMEOUTS: read 1s
    p = graygate_process("serve", "-c", cfg.path.name)
    await wait_up(p, cfg.port, cfg.admin_port)
    rc, out = await curl(cfg.url + "/warm")
    assert (rc, out) == (0, b"warm")
    rss_before = proc_status_kib(p.proc.pid, "VmRSS")

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", cfg.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: shop\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        got = bytearray()
        rate = 256 * 1000  # bytes per second
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 10:
            allowed = int(rate * elapsed) - len(got)
            if allowed <= 0:
                await asyncio.sleep(0.02)
                continue
            chunk = await asyncio.wait_for(reader.read(min(allowed, 65536)), 2)
            assert chunk, f"graygate closed the connection after {len(got)} bytes"
            got += chunk
        hwm = proc_status_kib(p.proc.pid, "VmHWM")
        assert len(got) >= rate * 9, f"only {len(got)} bytes in 10 s"
        assert got == body[: len(got)], "bytes lost or changed on the way"
        assert up.closed_by_proxy == 0 and len(up.tasks) == 1, "the upstream was cut"
        assert sent["bytes"] < 48 * MIB, f"upstream not held back: it sent {sent['bytes']}"
        growth_mib = (hwm - rss_before) / 1024
        print(f"proxy VmRSS before {rss_before} kB, VmHWM after {hwm} kB, sent {sent['bytes']}")
        assert growth_mib < 30, f"RSS grew by {growth_mib:.1f} MiB for a slow 64 MiB answer"
        # Still the same answer, still flowing: the next bytes follow on where they stopped.
        more = await asyncio.wait_for(reader.readexactly(MIB), 10)
        assert more == body[len(got) : len(got) + MIB]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# ---- demo ----------------------------------------------------------------------------------


async def test_demo_weights_and_status(tmp_path: Path, graygate_process) -> None:
    ports = {old: free_port() for old in (8080, 9001, 9002, 9901)}
    text = (ROOT / "config" / "demo.yaml").read_text()
    for old, new in ports.items():
        text = text.replace(str(old), str(new))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "demo.yaml").write_text(text)
    data_url = f"http://127.0.0.1:{ports[8080]}"
    admin_url = f"http://127.0.0.1:{ports[9901]}"

    p = graygate_process("demo", "-c", "config/demo.yaml")
    await wait_up(p, ports[9001], ports[9002], ports[8080], ports[9901])
    status, headers, body = await curl_get(data_url + "/")
    assert status == 200
    assert headers["x-graygate-version"] in ("blue", "green")
    assert json.loads(body)["version"] == headers["x-graygate-version"]

    rc, out, err = await run_cli_async(
        tmp_path, "weights", "demo", "blue=0", "green=100", "--admin", admin_url
    )
    assert rc == 0, err
    assert "blue=0 green=100" in out
    for _ in range(20):
        status, headers, body = await curl_get(data_url + "/")
        assert status == 200
        assert headers["x-graygate-version"] == "green"
        assert json.loads(body)["version"] == "green"

    rc, out, err = await run_cli_async(tmp_path, "status", "--admin", admin_url)
    assert rc == 0, err
    assert "demo" in out
    assert "blue=0 green=100" in out

    p.proc.send_signal(signal.SIGINT)
    assert await wait_exit(p) == 0, p.output()


async def test_serve_lifts_the_open_file_soft_limit(tmp_path: Path, graygate_process) -> None:
    """A soft limit of 256 descriptors would cap a proxy at ~120 clients: serve raises it
    to the hard limit at start."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cfg = Cfg(tmp_path, [route_config(unused_endpoint())])
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the child
    try:
        p = graygate_process("serve", "-c", cfg.path.name)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await wait_up(p, cfg.port, cfg.admin_port)
    limits = Path(f"/proc/{p.proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert int(line.split()[3]) > 256, line
    p.proc.terminate()
    assert await wait_exit(p) == 0
