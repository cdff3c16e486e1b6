"""Shadow traffic through the real data plane (proxy/dataplane/mirror.py, shadow.py): real
aiohttp upstreams on loopback, the real App in-process, real clients; results read from the
gateway's Mirrors. A slow or refusing shadow changes nothing for users."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from proxy.core.mirror import MirrorStats
from proxy.dataplane.mirror import suffixed
from tests.helpers import free_port, raw_request, route_config

FAST = {"connect": "500ms", "read": "3s", "request": "5s"}


def stats_of(gw: Any, version: str = "green", route: str = "shop") -> MirrorStats:
    return gw.app.gateway.mirrors.get(route, version)


async def settled(ms: MirrorStats, total: int, within: float = 5.0) -> None:
    """Wait until `total` copies have a result (dropped included) and none is in flight."""
    deadline = time.monotonic() + within
    while sum(ms.results.values()) < total or ms.inflight:
        assert time.monotonic() < deadline, (ms.results, ms.inflight)
        await asyncio.sleep(0.01)


def json_handler(make: Any) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(make(request))

    return handler


async def mirrored(upstreams, gateway, blue=None, green=None, **mirror: Any) -> Any:
    b = await upstreams("blue", blue)
    g = await upstreams("green", green)
    route = route_config(b.url, g.url, mirror={"percent": 100, **mirror})
    gw = await gateway([route], timeouts=FAST)
    return gw, b, g


async def get_all(gw: Any, n: int, path: str = "/", **kw: Any) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.get(gw.url + path, **kw) as resp:
                await resp.read()
                statuses.append(resp.status)
    return statuses


async def test_identical_answers_match_and_the_copy_says_it_is_a_shadow(upstreams, gateway):
    same = json_handler(lambda r: {"path": r.path, "n": 1})
    gw, blue, green = await mirrored(
        upstreams, gateway, same, same, host_suffix="-shadow", compare={"body": "json"}
    )
    ms = stats_of(gw)
    assert await get_all(gw, 5, "/a?x=1", headers={"Host": "shop.example.com:8080"}) == [200] * 5
    await settled(ms, 5)
    assert ms.results["match"] == 5 and ms.window_samples == 5 and not ms.recent
    assert len(blue.requests) == 5 and len(green.requests) == 5
    shadow = dict((k.lower(), v) for k, v in green.requests[0]["headers"])
    assert shadow[b"x-graygate-shadow"] == b"1"
    assert shadow[b"host"] == b"shop.example.com-shadow:8080"
    assert green.requests[0]["path"] == "/a?x=1"
    assert all(k.lower() != b"x-graygate-shadow" for k, _ in blue.requests[0]["headers"])


def test_host_suffix_goes_before_the_port():
    assert suffixed(b"shop.example.com:8080", b"-shadow") == b"shop.example.com-shadow:8080"
    assert suffixed(b"shop.example.com", b"-shadow") == b"shop.example.com-shadow"
    assert suffixed(b"[::1]:80", b"-s") == b"[::1]-s:80"


async def test_one_json_field_differs_body_mismatch_with_its_path(upstreams, gateway):
    blue = json_handler(lambda r: {"id": 7, "price": 10, "at": time.time()})
    green = json_handler(lambda r: {"id": 7, "price": 12, "at": time.time()})
    gw, _, _ = await mirrored(
        upstreams,
        gateway,
        blue,
        green,
        compare={"body": "json", "ignore_json_paths": ["$.at"], "headers": ["content-type"]},
    )
    ms = stats_of(gw)
    await get_all(gw, 3, "/item?secret=1")
    await settled(ms, 3)
    assert ms.results["body_mismatch"] == 3 and ms.window_mismatches == 3
    (m, *_) = ms.recent
    assert (m.route, m.version, m.method, m.path) == ("shop", "green", "GET", "/item")
    assert m.status == (200, 200) and m.headers == ()
    assert [(d.path, d.primary, d.shadow) for d in m.json_paths] == [("$.price", "10", "12")]
    assert len(m.digests[0]) == 32 and m.digests[0] != m.digests[1]


async def test_an_ignored_field_that_always_differs_matches(upstreams, gateway):
    def answer(r: web.Request) -> dict[str, Any]:
        return {"id": 7, "timestamp": time.time(), "request_id": random.random()}

    gw, _, _ = await mirrored(
        upstreams,
        gateway,
        json_handler(answer),
        json_handler(answer),
        compare={"body": "json", "ignore_json_paths": ["$.timestamp", "$.request_id"]},
    )
    ms = stats_of(gw)
    await get_all(gw, 4)
    await settled(ms, 4)
    assert ms.results["match"] == 4


async def test_status_wins_over_headers_and_body(upstreams, gateway):
    async def green(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom", headers={"Set-Cookie": "s=secret"})

    gw, _, _ = await mirrored(upstreams, gateway, None, green, compare={"headers": ["set-cookie"]})
    ms = stats_of(gw)
    await get_all(gw, 2)
    await settled(ms, 2)
    assert ms.results["status_mismatch"] == 2
    m = ms.recent[-1]
    assert m.status == (200, 500) and m.headers == ("set-cookie",)
    assert "secret" not in repr(m.to_json())  # header values are never kept


async def test_noise_from_stable_does_not_count_against_the_canary(upstreams, gateway):
    def noisy(r: web.Request) -> dict[str, Any]:
        return {"id": 7, "nonce": random.random()}  # differs on stable too

    gw, blue, green = await mirrored(
        upstreams,
        gateway,
        json_handler(noisy),
        json_handler(noisy),
        noise="stable",
        compare={"body": "json"},
    )
    ms = stats_of(gw)
    await get_all(gw, 10)
    await settled(ms, 10)
    assert ms.results["match"] == 10
    assert len(blue.requests) == 20 and len(green.requests) == 10  # user + stable copy


async def test_noise_floor_keeps_the_canarys_own_difference(upstreams, gateway):
    def stable(r: web.Request) -> dict[str, Any]:
        return {"v": 1, "nonce": random.random()}

    def canary(r: web.Request) -> dict[str, Any]:
        return {"v": 2, "nonce": random.random()}

    gw, _, _ = await mirrored(
        upstreams,
        gateway,
        json_handler(stable),
        json_handler(canary),
        noise="stable",
        compare={"body": "json"},
    )
    ms = stats_of(gw)
    await get_all(gw, 5)
    await settled(ms, 5)
    assert ms.results["body_mismatch"] == 5
    assert [d.path for d in ms.recent[-1].json_paths] == ["$.v"]  # the nonce was noise


async def test_refusing_shadow_users_see_no_error(upstreams, gateway):
    blue = await upstreams("blue")
    dead = f"http://127.0.0.1:{free_port()}"
    route = route_config(blue.url, dead, mirror={"percent": 100})
    gw = await gateway([route], timeouts=FAST)
    ms = stats_of(gw)
    assert await get_all(gw, 5) == [200] * 5
    await settled(ms, 5)
    assert ms.results["shadow_error"] == 5 and ms.window_mismatches == 5
    m = ms.recent[-1]
    assert m.result == "shadow_error" and m.status == (200, 0) and "connect" in m.detail
    stats = gw.app.gateway.stats.get("shop", "green")
    assert stats.inflight == 0  # the shadow never counts as the version's traffic


async def test_post_is_mirrored_only_when_listed_and_bodies_are_bounded(upstreams, gateway):
    gw, _, green = await mirrored(upstreams, gateway, max_body_bytes=10)
    ms = stats_of(gw)
    async with aiohttp.ClientSession() as session, session.post(gw.url + "/p", data=b"x") as resp:
        assert resp.status == 200
    await asyncio.sleep(0.2)
    assert ms.results == dict.fromkeys(ms.results, 0) and len(green.requests) == 0

    gw2, _, green2 = await mirrored(upstreams, gateway, methods=["GET", "POST"], max_body_bytes=10)
    ms2 = stats_of(gw2)
    async with aiohttp.ClientSession() as session:
        async with session.post(gw2.url + "/p", data=b"hello") as resp:
            assert (await resp.json())["len"] == 5
        async with session.post(gw2.url + "/p", data=b"x" * 100) as resp:
            assert (await resp.json())["len"] == 100

        async def chunks():
            for _ in range(4):
                yield b"abcdef"

        async with session.post(gw2.url + "/p", data=chunks()) as resp:
            assert (await resp.json())["len"] == 24
    await settled(ms2, 3)
    assert ms2.dropped["max_body_bytes"] == 2 and ms2.results["dropped"] == 2
    assert ms2.window_samples == 1 and len(green2.requests) == 1


async def test_forced_requests_are_not_mirrored_by_default(upstreams, gateway):
    b = await upstreams("blue")
    g = await upstreams("green")
    force = [{"header": "X-Canary", "value": "never", "to": "stable"}]
    route = route_config(b.url, g.url, force=force, mirror={"percent": 100})
    gw = await gateway([route], timeouts=FAST)
    ms = stats_of(gw)
    await get_all(gw, 3, headers={"X-Canary": "never"})
    await get_all(gw, 1)
    await settled(ms, 1)
    assert sum(ms.results.values()) == 1 and len(g.requests) == 1


async def test_primary_incomplete_is_dropped(upstreams, gateway):
    async def blue(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1)  # past the read timeout: graygate answers 504
        return web.Response(text="late")

    b = await upstreams("blue", blue)
    g = await upstreams("green")
    route = route_config(b.url, g.url, mirror={"percent": 100})
    gw = await gateway([route], timeouts={**FAST, "read": "300ms"})
    ms = stats_of(gw)
    resp = await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 8)
    assert resp.startswith(b"HTTP/1.1 504")
    await settled(ms, 1)
    assert ms.dropped["primary_incomplete"] == 1 and ms.window_samples == 0


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


# The slow shadow runs in a process of its own: in this one its request handling would land
# in the users' latency, which a real shadow elsewhere never does.
SLOW_SHADOW = """
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            await asyncio.sleep(2)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 4\\r\\n\\r\\nlate")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


async def slow_shadow() -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SLOW_SHADOW, str(port))
    for _ in range(500):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        return proc, f"http://127.0.0.1:{port}"
    proc.kill()
    raise AssertionError("the slow shadow did not start")


async def test_slow_shadow_leaves_users_p99_alone_and_excess_copies_drop(upstreams, gateway):
    b = await upstreams("blue")
    proc, shadow = await slow_shadow()
    try:
        plain = route_config(b.url, shadow, name="plain", match={"path_prefix": "/plain"})
        shop = route_config(b.url, shadow, mirror={"percent": 100, "max_inflight": 64})
        gw = await gateway([plain, shop], timeouts=FAST)
        ms = stats_of(gw)
        rounds: dict[str, list[float]] = {"/plain": [], "/shop": []}
        async with aiohttp.ClientSession() as session:
            # Warm up both routes' connections, the shadow pool's 64 included: opening them
            # is a one-time cost, not the steady state this measures.
            for path in ["/plain", "/shop"] * 64:
                async with session.get(gw.url + path) as resp:
                    await resp.read()
            await settled(ms, 64)  # no copy of the warm-up is still in flight
            for _ in range(5):  # the median of five runs: this box is shared and noisy
                times: dict[str, list[float]] = {"/plain": [], "/shop": []}
                for i in range(400):
                    path = "/plain" if i % 2 else "/shop"  # interleaved: the same conditions
                    t0 = time.perf_counter()
                    async with session.get(gw.url + path) as resp:
                        await resp.read()
                        assert resp.status == 200
                    times[path].append(time.perf_counter() - t0)
                for path, samples in times.items():
                    rounds[path].append(p99(samples))
        base, with_mirror = statistics.median(rounds["/plain"]), statistics.median(rounds["/shop"])
        assert with_mirror <= base + max(0.001, base * 0.1), rounds
        assert ms.dropped["max_inflight"] >= 100  # 1000 copies in a few s, 64 at a time
        await settled(ms, 1064, within=6)
        assert ms.results["dropped"] == ms.dropped["max_inflight"]
        assert ms.window_samples == 1064 - ms.dropped["max_inflight"]  # compared: 64 + 64 ...
    finally:
        proc.kill()
        await proc.wait()


async def test_shadow_timeout_is_a_shadow_error(upstreams, gateway):
    async def late(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1)
        return web.Response(text="late")

    gw, _, _ = await mirrored(upstreams, gateway, None, late, timeout="200ms")
    ms = stats_of(gw)
    assert await get_all(gw, 2) == [200, 200]
    await settled(ms, 2)
    assert ms.results["shadow_error"] == 2
    assert ms.recent[-1].detail == "no shadow answer within 0.2s"


async def test_forced_true_mirrors_testers_but_never_to_their_own_version(upstreams, gateway):
    b = await upstreams("blue")
    g = await upstreams("green")
    force = [
        {"header": "X-Canary", "value": "always", "to": "canary"},
        {"header": "X-Canary", "value": "never", "to": "stable"},
    ]
    route = route_config(b.url, g.url, force=force, mirror={"percent": 100, "forced": True})
    gw = await gateway([route], timeouts=FAST)
    ms = stats_of(gw)
    await get_all(gw, 2, headers={"X-Canary": "always"})  # served by green: no copy
    await get_all(gw, 3, headers={"X-Canary": "never"})
    await settled(ms, 3)
    assert sum(ms.results.values()) == 3 and len(g.requests) == 2 + 3


async def test_streamed_and_large_bodies_are_captured_whole(upstreams, gateway):
    big = bytes(range(256)) * 400  # 100 KiB: relayed as a passthrough view

    def streamer(last: bytes) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            if request.path == "/big":
                return web.Response(body=big[:-1] + last)
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)  # chunked
            for part in (b'{"items": [1, ', b"2, 3], ", b'"last": ' + last + b"}"):
                await resp.write(part)
            await resp.write_eof()
            return resp

        return handler

    gw, _, _ = await mirrored(
        upstreams, gateway, streamer(b"1"), streamer(b"1"), compare={"body": "json"}
    )
    ms = stats_of(gw)
    await get_all(gw, 1, "/json")
    await get_all(gw, 1, "/big")
    await settled(ms, 2)
    assert ms.results["match"] == 2

    gw2, _, _ = await mirrored(
        upstreams, gateway, streamer(b"1"), streamer(b"2"), compare={"body": "json"}
    )
    ms2 = stats_of(gw2)
    await get_all(gw2, 1, "/json")
    await get_all(gw2, 1, "/big")
    await settled(ms2, 2)
    assert ms2.results["body_mismatch"] == 2
    json_case, big_case = ms2.recent
    assert [(d.path, d.primary, d.shadow) for d in json_case.json_paths] == [("$.last", "1", "2")]
    assert big_case.json_paths == () and big_case.digests[0] != big_case.digests[1]


async def test_reload_keeps_the_counters_and_applies_the_new_mirror(upstreams, gateway):
    same = json_handler(lambda r: {"n": 1})
    gw, _, green = await mirrored(upstreams, gateway, same, same)
    ms = stats_of(gw)
    await get_all(gw, 2)
    await settled(ms, 2)
    path = gw.app.config_path
    data = yaml.safe_load(Path(path).read_text())
    data["routes"][0]["mirror"]["percent"] = 0  # mirroring off
    Path(path).write_text(yaml.safe_dump(data))
    await gw.app.reload()
    assert stats_of(gw) is ms and gw.app.gateway.runtime.routes["shop"].mirror is None
    await get_all(gw, 2)
    await asyncio.sleep(0.1)
    assert ms.results["match"] == 2 and len(green.requests) == 2
    data["routes"][0]["mirror"]["percent"] = 100
    Path(path).write_text(yaml.safe_dump(data))
    await gw.app.reload()
    await get_all(gw, 1)
    await settled(ms, 3)
    assert ms.results["match"] == 3
