"""The `redis` state backend against a real redis-server: replicas (real App instances)
sharing weights within a second, state surviving a restart, one controller lease holder
with takeover, refusal of stale writes, and clear errors for an unreachable or bad store."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from proxy.app import StartupError
from proxy.control.store.redis import RedisStateError, RedisStateStore
from proxy.control.store.writer import LeaseLost
from proxy.core.state import RouteState
from tests.helpers import free_port, route_config, wait_until

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, without persistence, for this module."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail(
            "redis-server is not installed: these tests need the real server "
            "(Debian/Ubuntu: apt-get install redis-server)"
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--save", "", "--appendonly", "no", "--port", str(port), "--bind", "127.0.0.1"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prefix() -> str:
    return f"gg-test-{next(_prefixes)}-{time.monotonic_ns()}"


def redis_state(url: str, prefix: str) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": url, "redis_prefix": prefix}


async def two_versions(upstreams: Any) -> dict[str, Any]:
    blue = await upstreams("blue")
    green = await upstreams("green")
    return route_config(blue.url, green.url, rollout={"steps": [50, 100], "interval": "1s"})


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def put_weights(session: aiohttp.ClientSession, admin: str, weights: dict[str, int]) -> Any:
    async with session.put(f"{admin}/api/v1/routes/shop/weights", json=weights) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def wait_for(check: Any, timeout: float, step: float = 0.02) -> float:
    """Seconds until `check()` (async) is true; fails after `timeout`."""
    start = time.monotonic()
    await wait_until(check, timeout, step)
    return time.monotonic() - start


async def test_weights_reach_the_other_replica_within_a_second(
    redis_url, prefix, gateway, upstreams
):
    route = await two_versions(upstreams)
    a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    b = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    async with aiohttp.ClientSession() as s:
        answer = await put_weights(s, a.admin_url, {"blue": 0, "green": 100})
        revision = answer["state"]["revision"]

        async def b_sees_it() -> bool:
            body = await get_json(s, f"{b.admin_url}/api/v1/routes/shop")
            return bool(body["state"]["weights"] == {"blue": 0, "green": 100})

        took = await wait_for(b_sees_it, timeout=1.0)
        assert took < 1.0
        body = await get_json(s, f"{b.admin_url}/api/v1/routes/shop")
        # Adopted with the writer's revision, not bumped again on B.
        assert body["state"]["revision"] == revision == body["revision"]
        for _ in range(20):
            async with s.get(f"{b.url}/x") as resp:
                assert resp.headers["X-Upstream"] == "green"
        # B's change flows back to A the same way, and both agree on the revision.
        again = await put_weights(s, b.admin_url, {"blue": 70, "green": 30})
        assert again["state"]["revision"] == revision + 1

        async def a_sees_it() -> bool:
            body = await get_json(s, f"{a.admin_url}/api/v1/routes/shop")
            return bool(body["state"]["weights"] == {"blue": 70, "green": 30})

        await wait_for(a_sees_it, timeout=1.0)
        assert a.app.store.state("shop").revision == revision + 1


async def test_restart_keeps_weights_and_events(redis_url, prefix, gateway, upstreams):
    route = await two_versions(upstreams)
    a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    async with aiohttp.ClientSession() as s:
        answer = await put_weights(s, a.admin_url, {"blue": 40, "green": 60})
    await a.app.shutdown()
    stored = redis.Redis.from_url(redis_url)
    try:
        doc = json.loads(stored.hget(f"{prefix}:routes", "shop"))
        assert doc["weights"] == {"blue": 40, "green": 60}
        assert len(stored.lrange(f"{prefix}:events", 0, -1)) == 1
    finally:
        stored.close()
    again = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    state = again.app.store.state("shop")
    assert dict(state.weights) == {"blue": 40, "green": 60}
    assert state.revision == answer["state"]["revision"]
    assert [e.action for e in again.app.events.since(0)] == ["weights"]


async def test_one_lease_holder_and_takeover_after_shutdown(redis_url, prefix, gateway, upstreams):
    route = await two_versions(upstreams)
    a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    b = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    assert a.app.redis is not None and b.app.redis is not None
    ra, rb = a.app.redis, b.app.redis

    async def someone_leads() -> bool:
        return ra.holds_lease() or rb.holds_lease()

    await wait_for(someone_leads, timeout=3.0)
    for _ in range(30):  # 1.5 s: never both, never none once taken
        assert ra.holds_lease() != rb.holds_lease()
        await asyncio.sleep(0.05)
    holder, other = (a, b) if ra.holds_lease() else (b, a)
    assert holder.app.redis is not None and other.app.redis is not None
    client = redis.Redis.from_url(redis_url)
    try:
        # The lease holds the holder's id and its fencing token.
        assert client.get(f"{prefix}:lease").decode() == holder.app.redis.fence
        assert holder.app.redis.fence.startswith(holder.app.redis.backend.writer + ":")
        await holder.app.shutdown()
        follower = other.app.redis

        async def took_over() -> bool:
            return follower.holds_lease()

        took = await wait_for(took_over, timeout=3.0)
        assert took < 2.0
        taken = client.get(f"{prefix}:lease").decode()
        assert taken == follower.fence and taken.startswith(follower.backend.writer + ":")
        # A new holder gets a larger token than the one before.
        assert int(taken.rsplit(":", 1)[1]) > int(holder.app.redis.fence.rsplit(":", 1)[1])
    finally:
        client.close()


async def test_controller_steps_only_while_holding_the_lease(redis_url, prefix, gateway, upstreams):
    route = await two_versions(upstreams)
    client = redis.Redis.from_url(redis_url)
    try:
        # Another replica (a foreign id) holds the lease: this one must not step rollouts.
        client.set(f"{prefix}:lease", "someone-else", px=60_000)
        a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{a.admin_url}/api/v1/routes/shop/rollout", json={"canary": "green"}
            ) as resp:
                assert resp.status == 200, await resp.text()
            started = a.app.store.state("shop")
            assert started.rollout.phase == "progressing"
            await asyncio.sleep(2.5)  # two controller intervals, no judgement taken
            assert a.app.store.state("shop") == started
            assert a.app.redis is not None and not a.app.redis.holds_lease()
            client.delete(f"{prefix}:lease")

            # Without traffic the leader's first judgement is "too few samples": counted.
            async def judged() -> bool:
                return a.app.store.state("shop").rollout.inconclusive >= 1

            await wait_for(judged, timeout=4.0)
            assert a.app.redis.holds_lease()
            assert a.app.store.state("shop").revision == started.revision + 1
    finally:
        client.close()


async def test_unreachable_redis_stops_start_with_the_url(gateway, upstreams, prefix):
    route = await two_versions(upstreams)
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(StartupError, match=r"state\.redis_url redis://127\.0\.0\.1:\d+/0: cannot"):
        await gateway(routes=[route], state=redis_state(url, prefix))


async def test_unreadable_stored_state_stops_start(redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(f"{prefix}:routes", "shop", "{not json")
    finally:
        client.close()
    store = RedisStateStore(redis_url, prefix)
    with pytest.raises(RedisStateError, match=r"invalid.*--reset-state"):
        await store.open()
    reset = RedisStateStore(redis_url, prefix)
    assert await reset.open(reset=True) is None
    await reset.close()


async def test_stale_write_is_refused_and_equal_revision_wins(redis_url, prefix):
    a = RedisStateStore(redis_url, prefix, writer="a")
    b = RedisStateStore(redis_url, prefix, writer="b")
    assert await a.open() is None
    assert await b.open() is None
    try:
        newer = RouteState((("blue", 10), ("green", 90)), "blue", revision=5)
        older = RouteState((("blue", 90), ("green", 10)), "blue", revision=4)
        assert await a.save({"shop": newer}, []) == []
        assert await b.save({"shop": older}, []) == ["shop"]
        assert (await a.load_routes(["shop"]))["shop"] == newer
        same = RouteState((("blue", 20), ("green", 80)), "blue", revision=5)
        assert await b.save({"shop": same}, []) == []
        assert (await a.load_routes(["shop"]))["shop"] == same
        # a's notices name the writer and the written routes.
        assert a.pubsub is not None
        seen = []
        for _ in range(20):
            m = await a.pubsub.get_message(timeout=0.1)
            if m is not None and m["type"] == "message":
                seen.append(json.loads(m["data"]))
        assert seen == [{"writer": "a", "routes": ["shop"]}, {"writer": "b", "routes": ["shop"]}]
    finally:
        await a.close()
        await b.close()


async def test_a_change_from_another_replica_reaches_every_worker(
    redis_url, prefix, gateway, upstreams, graygate_process, tmp_path
):
    """A `workers: 2` replica adopts what an in-process replica writes: every worker."""
    import yaml

    route = await two_versions(upstreams)
    port, admin_port = free_port(), free_port()
    conf = tmp_path / "workers.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin": {"listen": f"127.0.0.1:{admin_port}"},
                "state": redis_state(redis_url, prefix),
                "workers": 2,
                "routes": [route],
            }
        )
    )
    p = graygate_process("serve", "-c", conf.name)
    other = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    async with aiohttp.ClientSession() as session:

        async def up() -> bool:
            try:
                await get_json(session, f"http://127.0.0.1:{admin_port}/healthz")
                async with session.get(f"http://127.0.0.1:{port}/") as r:  # workers serve
                    assert r.status == 200
            except aiohttp.ClientError:
                assert p.proc.poll() is None, p.output()
                return False
            return True

        await wait_for(up, 30)
        await put_weights(session, other.admin_url, {"blue": 0, "green": 100})

        async def all_green() -> bool:
            versions = set()
            for _ in range(16):  # fresh connections: both workers
                async with session.get(
                    f"http://127.0.0.1:{port}/", headers={"Connection": "close"}
                ) as r:
                    versions.add(r.headers["X-Graygate-Version"])
            return versions == {"green"}

        assert await wait_for(all_green, 2.0) < 2.0


# ---- faults: compare-and-set, fencing, redis down, redis restarted empty -------------------


async def test_a_change_computed_on_an_old_revision_is_refused_with_the_stored_state(
    redis_url, prefix
):
    a = RedisStateStore(redis_url, prefix, writer="a")
    assert await a.open() is None
    try:
        first = RouteState((("blue", 90), ("green", 10)), "blue", revision=2)
        assert await a.commit("shop", 1, first) == ("ok", None)  # redis held nothing
        second = RouteState((("blue", 50), ("green", 50)), "blue", revision=3)
        assert await a.commit("shop", 2, second) == ("ok", None)
        late = RouteState((("blue", 0), ("green", 100)), "blue", revision=3)
        assert await a.commit("shop", 2, late) == ("stale", second)
        assert (await a.load_routes(["shop"]))["shop"] == second
    finally:
        await a.close()


async def test_a_stale_leaders_fenced_write_is_refused(redis_url, prefix):
    a = RedisStateStore(redis_url, prefix, writer="a")
    b = RedisStateStore(redis_url, prefix, writer="b")
    await a.open()
    await b.open()
    client = redis.Redis.from_url(redis_url)
    try:
        a_fence = await a.hold_lease(60_000)
        assert a_fence == "a:1" and await b.hold_lease(60_000) is None
        assert await a.hold_lease(60_000, a_fence) == a_fence  # renewed, same token
        step = RouteState((("blue", 90), ("green", 10)), "blue", revision=2)
        assert await a.commit("shop", 1, step, a_fence) == ("ok", None)
        # a stalls past its lease (expiry simulated), b takes over with a larger token.
        client.delete(f"{prefix}:lease")
        b_fence = await b.hold_lease(60_000)
        assert b_fence == "b:2"
        late = RouteState((("blue", 100), ("green", 0)), "blue", revision=3)
        assert await a.commit("shop", 2, late, a_fence) == ("fenced", None)
        assert await a.hold_lease(60_000, a_fence) is None  # and cannot renew it either
        assert await b.commit("shop", 2, late, b_fence) == ("ok", None)
        # Even the same replica retaking the lease later cannot replay an old token.
        client.delete(f"{prefix}:lease")
        again = await a.hold_lease(60_000, a_fence)
        assert again == "a:3"
        assert await a.commit("shop", 3, step, a_fence) == ("fenced", None)
    finally:
        client.close()
        await a.close()
        await b.close()


async def test_controller_write_without_the_lease_changes_nothing(
    redis_url, prefix, gateway, upstreams
):
    route = await two_versions(upstreams)
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(f"{prefix}:lease", "someone-else:99", px=60_000)
        a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
        assert a.app.redis is not None
        await a.app.redis.flush()  # the start-up state is in redis
        before = a.app.store.state("shop")
        with pytest.raises(LeaseLost):
            await a.app.redis.change("shop", lambda s: s, fenced=True)
        # Believing in a lease redis no longer holds for us is caught by the store itself.
        a.app.redis._lease_until = time.monotonic() + 60
        a.app.redis.fence = "stale-writer:1"
        with pytest.raises(LeaseLost, match="moved"):
            await a.app.redis.change("shop", lambda s: s, fenced=True)
        assert not a.app.redis.holds_lease()
        assert a.app.store.state("shop") == before
        assert json.loads(client.hget(f"{prefix}:routes", "shop"))["revision"] == before.revision
    finally:
        client.close()


async def test_a_write_whose_reply_was_lost_and_retried_counts_once(
    redis_url, prefix, gateway, upstreams
):
    route = await two_versions(upstreams)
    a = await gateway(routes=[route], state=redis_state(redis_url, prefix))
    assert a.app.redis is not None
    backend = a.app.redis.backend
    real = backend.commit

    async def replayed(route: str, expected: int, state: RouteState, fence: str = "") -> Any:
        # The script ran, the reply was lost, the client retried: redis now holds `state`.
        assert await real(route, expected, state, fence) == ("ok", None)
        return await real(route, expected, state, fence)

    backend.commit = replayed  # type: ignore[method-assign]
    before, after = await a.app.redis.change(
        "shop", lambda s: dataclasses.replace(s, weights=(("blue", 60), ("green", 40)))
    )
    assert after.revision == before.revision + 1
    assert a.app.store.state("shop") == after


async def test_redis_down_admin_503_changes_nothing_then_both_reconcile(
    redis_server, prefix, gateway, upstreams
):
    route = await two_versions(upstreams)
    state = redis_state(redis_server.url, prefix)
    a = await gateway(routes=[route], state=state)
    b = await gateway(routes=[route], state=state)
    async with aiohttp.ClientSession() as s:
        answer = await put_weights(s, a.admin_url, {"blue": 80, "green": 20})
        revision = answer["state"]["revision"]

        async def b_at(weights: dict[str, int]) -> bool:
            return dict(b.app.store.state("shop").weights) == weights

        await wait_for(lambda: b_at({"blue": 80, "green": 20}), timeout=1.0)
        redis_server.stop()
        calls = [
            ("PUT", "/routes/shop/weights", {"blue": 0, "green": 100}),
            ("POST", "/routes/shop/rollout", {"canary": "green"}),
            ("POST", "/reload", None),
        ]
        for gw in (a, b):
            for method, path, body in calls:
                started = time.monotonic()
                async with s.request(method, f"{gw.admin_url}/api/v1{path}", json=body) as resp:
                    assert resp.status == 503, await resp.text()
                    error = (await resp.json())["error"]
                assert time.monotonic() - started < 3.0
                assert error["code"] == "state_unavailable"
                assert "nothing was changed" in error["message"]
        for gw in (a, b):
            st = gw.app.store.state("shop")
            assert dict(st.weights) == {"blue": 80, "green": 20} and st.revision == revision
            assert st.rollout.phase == "idle"
            for _ in range(5):  # the data plane serves the last snapshot meanwhile
                async with s.get(f"{gw.url}/x") as resp:
                    assert resp.status == 200

        async def down() -> bool:
            async with s.get(f"{a.admin_url}/metrics") as resp:
                return 'graygate_state_store_up{backend="redis"} 0.0' in await resp.text()

        await wait_for(down, timeout=3.0)
        redis_server.start()  # empty: redis kept nothing

        async def accepted() -> bool:
            async with s.put(
                f"{a.admin_url}/api/v1/routes/shop/weights", json={"blue": 10, "green": 90}
            ) as resp:
                return resp.status == 200

        await wait_for(accepted, timeout=2.0, step=0.1)
        took = await wait_for(lambda: b_at({"blue": 10, "green": 90}), timeout=2.0)
        assert took < 2.0
        assert a.app.store.state("shop").revision == b.app.store.state("shop").revision


async def test_redis_restarted_empty_is_reseeded_from_the_newest_revision(
    redis_server, prefix, gateway, upstreams
):
    route = await two_versions(upstreams)
    state = redis_state(redis_server.url, prefix)
    a = await gateway(routes=[route], state=state)
    b = await gateway(routes=[route], state=state)
    async with aiohttp.ClientSession() as s:
        answer = await put_weights(s, a.admin_url, {"blue": 30, "green": 70})
    revision = answer["state"]["revision"]
    await wait_for(lambda: _at(b, revision), timeout=1.0)
    redis_server.stop()
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:

        async def reseeded() -> bool:
            raw = client.hget(f"{prefix}:routes", "shop")
            return raw is not None and json.loads(raw)["revision"] == revision

        took = await wait_for(reseeded, timeout=3.0)
        assert took < 2.0
        doc = json.loads(client.hget(f"{prefix}:routes", "shop"))
        assert doc["weights"] == {"blue": 30, "green": 70}
        seeded = [e for gw in (a, b) for e in gw.app.events.since(0) if e.action == "state.reseed"]
        assert seeded and all(e.route == "shop" for e in seeded)
        assert f"re-seeded from revision {revision}" in (seeded[0].reason or "")

        async def event_stored() -> bool:
            stored = [json.loads(e) for e in client.lrange(f"{prefix}:events", 0, -1)]
            return any(e["action"] == "state.reseed" for e in stored)

        await wait_for(event_stored, timeout=2.0)
    finally:
        client.close()


async def _at(gw: Any, revision: int) -> bool:
    return bool(gw.app.store.state("shop").revision == revision)
