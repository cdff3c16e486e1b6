"""Several replicas, end to end: two real `graygate serve` processes sharing state in a real
redis-server, a real prometheus scraping both every second, and real aiohttp upstreams.
The leader judges from Prometheus over both replicas; Prometheus and Redis outages and a
SIGKILLed leader are survived. Intervals are short and injected through the config."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from test_rollout_e2e import Traffic, named, scrape

from tests.helpers import Process, RedisServer, free_port, route_config, wait_until

SCRAPE = 1.0  # prometheus scrape interval, and the windows' lag
INTERVAL = "3s"  # rollout interval: three scrapes per window
LEASE = 1.0  # controller lease
TIMEOUTS = {"connect": "500ms", "read": "2s", "request": "3s"}
_routes = itertools.count(1)


# ---- prometheus ---------------------------------------------------------------------------


class PrometheusServer:
    """The Debian package's prometheus on a free port with its own config and storage,
    scraping the two replicas' admin ports every second; stoppable and restartable."""

    def __init__(self, workdir: Path, targets: list[int]) -> None:
        self.binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(self.binary).exists():
            pytest.fail(
                "prometheus is not installed: these tests need the real server "
                "(benchmarks/install_tools.sh, or apt-get install prometheus)"
            )
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        scrape = {
            "job_name": "graygate",
            "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
        }
        global_ = {"scrape_interval": f"{SCRAPE:g}s", "scrape_timeout": f"{SCRAPE:g}s"}
        self.config.write_text(yaml.safe_dump({"global": global_, "scrape_configs": [scrape]}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def scraping(self, targets: int = 2, timeout: float = 15.0) -> None:
        """Until every replica has been scraped (a new prometheus finds its targets only
        after its discovery's first 5 s round)."""
        await self.ready()
        query = {"query": 'sum(up{job="graygate"})'}
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                async with s.get(self.url + "/api/v1/query", params=query) as resp:
                    result = (await resp.json())["data"]["result"]
                if result and float(result[0]["value"][1]) >= targets:
                    return
                await asyncio.sleep(0.2)
        pytest.fail(f"prometheus did not scrape {targets} replicas within {timeout}s")

    async def ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                try:
                    async with s.get(self.url + "/-/ready") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass  # not listening yet
                await asyncio.sleep(0.1)
        pytest.fail(f"prometheus not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None


@dataclass
class Ports:
    a: int
    b: int


@pytest.fixture(scope="module")
def admin_ports() -> Ports:
    """The replicas' admin ports, fixed for the module: prometheus scrapes these."""
    return Ports(free_port(), free_port())


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, admin_ports: Ports
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), [admin_ports.a, admin_ports.b])
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---- replicas -----------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    process: Process
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


StartReplica = Callable[..., Awaitable[Replica]]


@pytest.fixture
def replica(tmp_path: Path, graygate_process: Any) -> StartReplica:
    """Factory: `await replica("a", admin_port, redis, route, prometheus=...)` runs the real
    `graygate serve` with the redis backend and waits until it is ready."""

    async def start(
        name: str,
        admin_port: int,
        redis: RedisServer,
        route: dict[str, Any],
        prometheus: PrometheusServer | None = None,
    ) -> Replica:
        port = free_port()
        data: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}",
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "state": {
                "backend": "redis",
                "redis_url": redis.url,
                "redis_prefix": f"e2e-{tmp_path.name}",
                "lease": f"{LEASE:g}s",
            },
            "timeouts": TIMEOUTS,
            "grace_period": "1s",
            "routes": [route],
        }
        if prometheus is not None:
            data["analysis"] = {
                "source": "prometheus",
                "prometheus": {
                    "url": prometheus.url,
                    "timeout": "1s",
                    "replicas_selector": 'job="graygate"',
                    "scrape_interval": f"{SCRAPE:g}s",
                },
            }
        path = tmp_path / f"replica-{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        process = graygate_process("serve", "-c", path.name)
        r = Replica(name, process, port, admin_port)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                assert process.proc.poll() is None, process.output()
                try:
                    async with s.get(r.admin + "/readyz") as resp:
                        if resp.status == 200:
                            return r
                except aiohttp.ClientError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, process.output()
                await asyncio.sleep(0.05)

    return start


def rollout(blue: str, green: str, steps: list[int], **analysis: Any) -> dict[str, Any]:
    route = route_config(
        blue,
        green,
        rollout={
            "steps": steps,
            "interval": INTERVAL,
            "failure_limit": 1,
            "max_inconclusive": 30,
            "analysis": {
                "min_samples": 30,
                "max_p99_latency": "1s",
                "max_latency_ratio": None,
                **analysis,
            },
        },
    )
    route["name"] = f"r{next(_routes)}"  # prometheus keeps every test's series apart
    return route


async def call(
    s: aiohttp.ClientSession, r: Replica, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    async with s.request(method, f"{r.admin}/api/v1{path}", **kwargs) as resp:
        return resp.status, await resp.json()


async def state(s: aiohttp.ClientSession, r: Replica, route: str) -> dict[str, Any]:
    status, body = await call(s, r, "GET", f"/routes/{route}")
    assert status == 200, body
    result: dict[str, Any] = body["state"]
    return result


async def leads(s: aiohttp.ClientSession, r: Replica) -> bool:
    return (await scrape(s, r.admin)).get(("graygate_controller_leader",)) == 1


async def controller_events(s: aiohttp.ClientSession, r: Replica, route: str) -> list[Any]:
    status, body = await call(s, r, "GET", f"/events?route={route}")
    assert status == 200, body
    return [e for e in body["events"] if e["actor"] == "rollout-controller"]


# ---- Prometheus as the metrics source ----------------------------------------------------


async def test_canary_failing_only_behind_b_is_rolled_back_by_a_from_prometheus(
    prometheus, admin_ports, replica, redis_server, upstreams
):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green_ok = await upstreams("green", named("green", lambda r, n: 200))
    green_bad = await upstreams("green", named("green", lambda r, n: 500))
    await prometheus.ready()
    # Same route on both; behind B the canary's endpoint fails (a bad zone, say).
    route_a = rollout(blue.url, green_ok.url, [50, 100])
    route_b = {
        **route_a,
        "versions": {**route_a["versions"], "green": {"endpoints": [green_bad.url]}},
    }
    name = route_a["name"]
    a = await replica("a", admin_ports.a, redis_server, route_a, prometheus)
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: leads(s, a), 5.0)
        b = await replica("b", admin_ports.b, redis_server, route_b, prometheus)
        traffic = [await Traffic(r.url, rate=80, workers=4).start() for r in (a, b)]
        await prometheus.scraping()
        try:
            status, body = await call(s, b, "POST", f"/routes/{name}/rollout", {"canary": "green"})
            assert status == 200, body
            started = time.monotonic()
            done = await wait_until(
                lambda: _phase(s, a, name, ("rolled_back", "promoted", "paused")), 15.0
            )
            took = time.monotonic() - started
        finally:
            for t in traffic:
                await t.stop()
        assert done == "rolled_back"
        assert not await leads(s, b)
        evs = await controller_events(s, a, name)
        (rollback,) = [e for e in evs if e["action"] == "rollout.rollback"]
        assert {e["action"] for e in evs} <= {"rollout.rollback", "rollout.hold"}, evs
        figures = rollback["figures"]
        assert figures["source"] == "prometheus"
        assert figures["canary_errors"] >= 30 and figures["canary_error_rate"] > 0.3, figures
        assert figures["window_end"] <= rollback["time"] - SCRAPE  # lags a scrape at least
        assert figures["window_end"] - figures["window_start"] >= 3.0
        # A's own traffic never saw a canary error: its local window would have passed.
        local = await scrape(s, a.admin)
        assert not any(k[0] == "graygate_requests_total" and "code=500" in k for k in local)
        assert (await state(s, b, name))["weights"] == {"blue": 100, "green": 0}
        print(f"rolled back by A {took:.1f}s after the start (window {INTERVAL}, lag {SCRAPE}s)")


async def test_healthy_canary_through_both_is_promoted_across_a_prometheus_outage(
    prometheus, admin_ports, replica, redis_server, upstreams
):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green = await upstreams("green", named("green", lambda r, n: 200))
    await prometheus.ready()
    route = rollout(blue.url, green.url, [50, 100])
    name = route["name"]
    a = await replica("a", admin_ports.a, redis_server, route, prometheus)
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: leads(s, a), 5.0)
        b = await replica("b", admin_ports.b, redis_server, route, prometheus)
        traffic = [await Traffic(r.url, rate=80, workers=4).start() for r in (a, b)]
        await prometheus.scraping()
        try:
            status, body = await call(s, a, "POST", f"/routes/{name}/rollout", {"canary": "green"})
            assert status == 200, body
            await wait_until(lambda: _step(s, a, name, 1), 10.0)  # passed at 50 %
            prometheus.stop()

            async def held_for_prometheus() -> bool:
                return any(
                    e["action"] == "rollout.hold" and "unreachable" in (e["reason"] or "")
                    for e in await controller_events(s, a, name)
                )

            await wait_until(held_for_prometheus, 8.0)
            assert (await state(s, a, name))["rollout"]["state"] == "progressing"
            prometheus.start()
            await prometheus.ready()
            done = await wait_until(
                lambda: _phase(s, a, name, ("rolled_back", "promoted", "paused")), 15.0
            )
        finally:
            for t in traffic:
                await t.stop()
        assert done == "promoted"
        final = await state(s, b, name)
        assert final["stable"] == "green" and final["weights"] == {"blue": 0, "green": 100}
        evs = await controller_events(s, a, name)
        actions = [e["action"] for e in evs]
        assert "rollout.fail" not in actions and actions[-1] == "rollout.promote", actions
        holds = [e for e in evs if e["action"] == "rollout.hold"]
        assert holds and all(e["after"]["rollout"]["failures"] == 0 for e in holds)
        verdicts = {e["after"]["rollout"]["last_verdict"]["verdict"] for e in holds}
        assert verdicts == {"need_more_samples"}
        assert all(e["figures"]["window_end"] > e["figures"]["window_start"] for e in evs)
        assert all(not t.failures for t in traffic), [t.failures[:3] for t in traffic]


async def _phase(s: aiohttp.ClientSession, r: Replica, route: str, phases: tuple[str, ...]) -> Any:
    phase = (await state(s, r, route))["rollout"]["state"]
    return phase if phase in phases else None


async def _step(s: aiohttp.ClientSession, r: Replica, route: str, step: int) -> bool:
    return bool((await state(s, r, route))["rollout"]["step"] == step)


# ---- Redis faults and leader failover ----------------------------------------------------


async def test_redis_stopped_under_load_serves_refuses_mutations_and_reconciles(
    replica, redis_server, upstreams
):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green = await upstreams("green", named("green", lambda r, n: 200))
    route = route_config(blue.url, green.url)
    route["name"] = name = f"r{next(_routes)}"
    a = await replica("a", free_port(), redis_server, route)
    b = await replica("b", free_port(), redis_server, route)
    weights = f"/routes/{name}/weights"

    async def on_b(expected: dict[str, int]) -> bool:
        return bool((await state(s, b, name))["weights"] == expected)

    async with aiohttp.ClientSession() as s:
        status, body = await call(s, a, "PUT", weights, {"blue": 70, "green": 30})
        assert status == 200, body
        answered = time.monotonic()
        await wait_until(lambda: on_b({"blue": 70, "green": 30}), 1.0, step=0.01)
        print(f"weights through A applied on B after {time.monotonic() - answered:.3f}s")

        traffic = [await Traffic(r.url, rate=300, workers=32).start() for r in (a, b)]  # 64
        try:
            await asyncio.sleep(0.5)
            redis_server.stop()
            await asyncio.sleep(0.5)
            before = {r.name: await state(s, r, name) for r in (a, b)}
            for r in (a, b):
                for method, path, payload in (
                    ("PUT", weights, {"blue": 0, "green": 100}),
                    ("POST", f"/routes/{name}/rollout", {"canary": "green"}),
                ):
                    status, body = await call(s, r, method, path, payload)
                    assert status == 503, body
                    assert body["error"]["code"] == "state_unavailable"
            await asyncio.sleep(1.0)  # serving on the last snapshot meanwhile
            assert {r.name: await state(s, r, name) for r in (a, b)} == before
            redis_server.start()
            back = time.monotonic()

            async def accepted() -> bool:
                status, _ = await call(s, a, "PUT", weights, {"blue": 20, "green": 80})
                return status == 200

            await wait_until(accepted, 2.0, step=0.05)
            answered = time.monotonic()
            await wait_until(lambda: on_b({"blue": 20, "green": 80}), 2.0, step=0.02)
            applied = time.monotonic()
            await asyncio.sleep(0.3)
        finally:
            for t in traffic:
                await t.stop()
        served = sum(len(t.hits) for t in traffic)
        failed = [f for t in traffic for f in t.failures]
        bad = [h.status for t in traffic for h in t.hits if h.status != 200]
        assert served > 500 and not failed and not bad, (failed[:3], bad[:3])
        print(
            f"{served} requests through a redis outage, 0 failed; mutation accepted "
            f"{answered - back:.2f}s after redis restarted, on B {applied - answered:.2f}s later"
        )


async def test_lease_holder_killed_mid_rollout_other_continues_from_the_same_step(
    prometheus, admin_ports, replica, redis_server, upstreams
):
    blue = await upstreams("blue", named("blue", lambda r, n: 200))
    green = await upstreams("green", named("green", lambda r, n: 200))
    await prometheus.ready()
    route = rollout(blue.url, green.url, [25, 50, 75, 100])
    name = route["name"]
    a = await replica("a", admin_ports.a, redis_server, route, prometheus)
    async with aiohttp.ClientSession() as s:
        await wait_until(lambda: leads(s, a), 5.0)
        b = await replica("b", admin_ports.b, redis_server, route, prometheus)
        to_b = await Traffic(b.url, rate=120, workers=4).start()
        await prometheus.scraping()
        try:
            status, body = await call(s, b, "POST", f"/routes/{name}/rollout", {"canary": "green"})
            assert status == 200, body
            await wait_until(lambda: _step(s, b, name, 1), 10.0)  # A advanced to 50 %
            at_kill = await state(s, b, name)
            a.process.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await wait_until(lambda: leads(s, b), 2 * LEASE + 0.5, step=0.02)
            took_over = time.monotonic() - killed

            async def b_decided() -> Any:
                return [e for e in await controller_events(s, b, name) if e["time"] > 0]

            decided = await wait_until(b_decided, 10.0)
        finally:
            await to_b.stop()
        assert took_over <= 2 * LEASE, f"lease taken over after {took_over:.2f}s"
        first = decided[0]
        # B went on from the stored step (1), not from the start of the rollout.
        assert first["before"]["rollout"]["step"] == 1 == at_kill["rollout"]["step"]
        assert first["before"]["revision"] == at_kill["revision"]
        assert first["action"] in ("rollout.advance", "rollout.hold"), first
        # Its first window starts where the stored verdict said the step began.
        assert first["figures"]["window_start"] >= at_kill["rollout"]["step_started"] - 0.01
        assert not to_b.failures, to_b.failures[:3]
        print(f"lease taken over {took_over:.2f}s after SIGKILL (lease {LEASE:g}s)")
