"""`workers: N` without processes: the config key, figures taken in a worker and merged in
the supervisor (exact counts, no double counting), the channel's framing, and the
read-your-writes middleware on a real aiohttp app."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.control.supervisor import read_your_writes
from proxy.core import figures
from proxy.core.config.load import parse_config
from proxy.core.config.model import ConfigError
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.channel import HEADER, Ack, Channel, Figures, Policy, frame
from tests.helpers import ROOT, FakeTransport, route_config


def config(**top: Any):
    route = route_config("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    return parse_config({"routes": [route], **top}, env={})


# ---- config ---------------------------------------------------------------------------------


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert config(workers="auto").workers == len(os.sched_getaffinity(0))
    assert config(workers=3).workers == 3
    assert config().workers == 1


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("many", "must be an integer 1..256 or auto"), (0, "must be 1..256"), (257, "1..256")],
)
def test_workers_refusals(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(workers=value)
    assert info.value.path == "workers"
    assert fragment in str(info.value)


def test_schema_takes_auto_and_integers() -> None:
    schema = json.loads((ROOT / "proxy" / "core" / "config" / "schema.json").read_text())
    workers = schema["properties"]["workers"]
    for good in ("auto", 1, 256):
        jsonschema.validate(good, workers)
    for bad in ("many", 0, 257, True):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, workers)


# ---- figures --------------------------------------------------------------------------------


def record_some(stats: Stats, rng: random.Random, n: int) -> list[tuple[str, int, str, float]]:
    done = []
    for _ in range(n):
        version = rng.choice(["blue", "green"])
        status = rng.choice([200, 200, 200, 503])
        reason = rng.choice(["weight", "cohort", "force_header"])
        seconds = rng.random() * 0.3
        stats.get("shop", version).record(status, reason, seconds)
        done.append((version, status, reason, seconds))
    return done


def test_batches_add_up_to_exactly_what_the_workers_counted() -> None:
    cfg = config()
    rng = random.Random(7)
    workers = [Stats.from_config(cfg), Stats.from_config(cfg)]
    single = Stats.from_config(cfg)  # what one process would have counted
    supervisor = Stats.from_config(cfg)
    for _ in range(5):  # five flush intervals
        for w in workers:
            for version, status, reason, seconds in record_some(w, rng, 300):
                single.get("shop", version).record(status, reason, seconds)
            w.get("shop", "green").upstream_error("reset")
            single.get("shop", "green").upstream_error("reset")
            batch = figures.take(w)
            # Through the channel's format, as between processes.
            figures.merge(supervisor, pickle.loads(pickle.dumps(batch)))
    for version in ("blue", "green"):
        got, want = supervisor.get("shop", version), single.get("shop", version)
        assert got.counts == want.counts
        assert got.bucket_counts == want.bucket_counts
        assert got.duration_sum == pytest.approx(want.duration_sum)
        assert got.upstream_errors == want.upstream_errors
        assert (got.window.requests, got.window.errors) == (
            want.window.requests,
            want.window.errors,
        )
        assert sorted(got.window.samples) == pytest.approx(sorted(want.window.samples))
    # Taken means gone from the worker: a second batch adds nothing.
    assert figures.take(workers[0]) == []


def test_window_excludes_forced_requests_and_counts_survive_a_full_reservoir() -> None:
    cfg = config()
    worker, supervisor = Stats.from_config(cfg), Stats.from_config(cfg)
    vs = worker.get("shop", "green")
    for i in range(7000):  # more than the worker's reservoir holds
        vs.record(500 if i % 10 == 0 else 200, "weight", 0.01)
    vs.record(200, "force_header", 0.01)
    figures.merge(supervisor, figures.take(worker))
    window = supervisor.get("shop", "green").window
    assert (window.requests, window.errors) == (7000, 700)
    assert len(window.samples) == window.size
    assert sum(supervisor.get("shop", "green").counts.values()) == 7001


def test_inflight_is_the_sum_of_the_last_reports_and_idle_pairs_are_left_out() -> None:
    cfg = config()
    a, b, supervisor = Stats.from_config(cfg), Stats.from_config(cfg), Stats.from_config(cfg)
    a.get("shop", "blue").inflight = 2
    b.get("shop", "blue").inflight = 3
    reports = [figures.inflight_of(figures.take(a)), figures.inflight_of(figures.take(b))]
    figures.set_inflight(supervisor, reports)
    assert supervisor.get("shop", "blue").inflight == 5
    assert figures.take(Stats.from_config(cfg)) == []  # nothing counted, nothing in flight
    figures.set_inflight(supervisor, reports[1:])  # worker a died
    assert supervisor.get("shop", "blue").inflight == 3


def test_merge_drops_a_route_a_reload_removed() -> None:
    worker = Stats.from_config(config())
    worker.get("shop", "blue").record(200, "weight", 0.001)
    batch = figures.take(worker)
    other = parse_config(
        {
            "routes": [
                {
                    "name": "api",
                    "match": {"host": "*", "path_prefix": "/"},
                    "versions": {"blue": {"endpoints": ["http://127.0.0.1:9001"]}},
                    "stable": "blue",
                }
            ]
        },
        env={},
    )
    supervisor = Stats.from_config(other)
    figures.merge(supervisor, batch)
    assert sum(vs.requests for _, _, vs in supervisor.items()) == 0


# ---- channel ---------------------------------------------------------------------------------


async def test_frames_cut_anywhere_arrive_whole_and_in_order() -> None:
    got: list[Any] = []
    channel = Channel(got.append, lambda: None)
    channel.connection_made(FakeTransport())  # type: ignore[arg-type]
    messages = [Ack(i) for i in range(50)] + [Figures([], None, final=True)]
    stream = b"".join(frame(m) for m in messages)
    rng = random.Random(3)
    i = 0
    while i < len(stream):
        step = rng.randint(1, 40)
        channel.data_received(stream[i : i + step])
        i += step
    assert got == messages
    assert channel.buffer == bytearray()


async def test_a_frame_that_is_not_ours_closes_the_channel(caplog) -> None:
    got: list[Any] = []
    channel = Channel(got.append, lambda: None)
    transport = FakeTransport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    channel.data_received(HEADER.pack(5) + b"nope!")
    assert transport.closing and got == []
    assert "unreadable frame" in caplog.text
    channel.data_received(HEADER.pack(1 << 30))  # oversize: refused before reading it
    assert got == []


async def test_send_writes_one_frame_and_nothing_after_close() -> None:
    channel = Channel(lambda m: None, lambda: None)
    transport = FakeTransport()
    channel.connection_made(transport)  # type: ignore[arg-type]
    channel.send(Policy(3, {}))
    data = transport.take()
    assert HEADER.unpack_from(data)[0] == len(data) - HEADER.size  # one frame, whole
    assert pickle.loads(data[HEADER.size :]) == Policy(3, {})
    channel.close()
    channel.send(Ack(4))
    assert transport.take() == b""


# ---- read-your-writes ------------------------------------------------------------------------


async def test_a_mutation_waits_for_settle_and_a_refused_one_does_not() -> None:
    store = PolicyStore(config())
    settled: list[int] = []
    gate = asyncio.Event()

    async def settle(generation: int) -> None:
        settled.append(generation)
        await gate.wait()

    async def change(request: web.Request) -> web.Response:
        store.set_weights("shop", {"blue": 50, "green": 50})
        return web.json_response({"ok": True})

    async def refuse(request: web.Request) -> web.Response:
        raise web.HTTPConflict()

    async def read(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[read_your_writes(store, settle)])
    app.router.add_put("/change", change)
    app.router.add_put("/refuse", refuse)
    app.router.add_get("/read", read)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/read")).status == 200
        assert settled == []
        assert (await client.put("/refuse")).status == 409
        assert settled == []
        pending = asyncio.create_task(client.put("/change"))
        await asyncio.sleep(0.1)
        assert not pending.done() and settled == [store.policy.generation]
        gate.set()
        assert (await pending).status == 200
