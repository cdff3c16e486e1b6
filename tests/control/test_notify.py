"""Webhook notifications (proxy/control/notify.py): the config keys, the payloads, and real
aiohttp receivers behind the real App: exactly the configured events, in order, retried
after two 500s; a hanging receiver does not slow a weight change; a full queue drops and
counts. Backoffs and timeouts are milliseconds here."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.control.metrics import NotificationCollector
from proxy.control.notify import Notifier, payload, safe_host
from proxy.control.store.events import EventLog
from proxy.core.config.describe import describe
from proxy.core.config.load import parse_config
from proxy.core.config.model import ConfigError, NotificationConfig
from tests.helpers import route_config, serve_app, wait_until

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---- config and payloads -------------------------------------------------------------------


def config_with(notifications: object) -> dict[str, Any]:
    return {"notifications": notifications, "routes": [route_config("http://127.0.0.1:9001")]}


def test_notifications_config_defaults_and_values():
    cfg = parse_config(
        config_with(
            [
                {"url": "https://hooks.example.com/T/B/x"},
                {
                    "name": "chat",
                    "url": "http://127.0.0.1:9/h",
                    "events": ["rollout.*", "weights"],
                    "format": "slack",
                    "timeout": "250ms",
                    "retries": 0,
                    "backoff": "50ms",
                },
            ]
        ),
        env={},
    )
    first, chat = cfg.notifications
    assert first == NotificationConfig("0", "https://hooks.example.com/T/B/x")
    assert first.events == ("*",) and first.format == "json" and first.retries == 3
    assert chat.events == ("rollout.*", "weights") and chat.timeout == 0.25
    assert (chat.retries, chat.backoff, chat.format) == (0, 0.05, "slack")
    assert parse_config(config_with(None), env={}).notifications == ()


@pytest.mark.parametrize(
    ("item", "path", "words"),
    [
        ({}, "notifications[0].url", "is required"),
        ({"url": "ftp://x/y"}, "notifications[0].url", "http:// or https://"),
        ({"url": "http:///nohost"}, "notifications[0].url", "http:// or https://"),
        ({"url": "http://x", "events": []}, "notifications[0].events", "at least one"),
        ({"url": "http://x", "events": ["a b"]}, "notifications[0].events[0]", "glob"),
        ({"url": "http://x", "format": "xml"}, "notifications[0].format", "json, slack"),
        ({"url": "http://x", "retries": 11}, "notifications[0].retries", "0..10"),
        ({"url": "http://x", "timeout": 0}, "notifications[0].timeout", "> 0"),
        ({"url": "http://x", "to": 1}, "notifications[0].to", "unknown key"),
    ],
)
def test_notifications_refusals_name_the_key(item: dict[str, Any], path: str, words: str):
    with pytest.raises(ConfigError) as err:
        parse_config(config_with([item]), env={})
    assert err.value.path == path and words in str(err.value)


def test_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match=r"notifications\[1\].name: duplicate"):
        parse_config(
            config_with([{"url": "http://a", "name": "x"}, {"url": "http://b", "name": "x"}]),
            env={},
        )


def test_payloads_carry_the_event_and_a_line_for_people():
    log = EventLog()
    before, after = {"weights": {"blue": 100}}, {"weights": {"blue": 90, "green": 10}}
    event = log.append("shop", "token", "weights", before, after, "canary", {"ratio": float("inf")})
    body = payload(event, "json")
    assert body["source"] == "graygate" and body["action"] == "weights" and body["id"] == 1
    assert body["after"] == {"weights": {"blue": 90, "green": 10}}
    assert body["figures"] == {"ratio": None}  # strict JSON: no Infinity
    json.dumps(body, allow_nan=False)
    assert payload(event, "slack") == {
        "text": "graygate route shop: weights by token: canary (weights blue=90 green=10)"
    }


def test_logs_and_check_show_the_host_never_the_url():
    secret = "https://user:pw@hooks.example.com:8443/T0/B0/secret?x=1"
    assert safe_host(secret) == "https://hooks.example.com:8443"
    text = describe(parse_config(config_with([{"url": secret, "name": "chat"}]), env={}))
    assert "notification chat: json to https://hooks.example.com:8443 on *" in text
    assert "secret" not in text and "pw" not in text


async def test_a_reload_restarts_changed_sinks_and_keeps_their_counters(receiver):
    async def ok(path: str, n: int) -> int:
        return 200

    rec = await receiver(ok)
    first = NotificationConfig("a", rec.url + "/one", events=("weights",))
    notifier = Notifier((first,))
    notifier.start()
    log = EventLog()
    log.subscribe(notifier.offer)
    try:
        log.append("shop", "test", "weights", None, None)
        await wait_until(lambda: notifier.counts["a"].delivered == 1, 10.0)
        await notifier.reconfigure((first,))  # unchanged: the same sink goes on
        assert notifier.sinks[0].config is first
        moved = NotificationConfig("a", rec.url + "/two", events=("reload",))
        await notifier.reconfigure((moved,))
        log.append("shop", "test", "weights", None, None)  # no longer wanted
        log.append(None, "test", "reload", None, None)
        await wait_until(lambda: notifier.counts["a"].delivered == 2, 10.0)
    finally:
        await notifier.close()
    assert [p for p, *_ in rec.attempts] == ["/one", "/two"]


# ---- a real receiver ---------------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    attempts: list[tuple[str, int, dict[str, Any], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def delivered(self, path: str) -> list[dict[str, Any]]:
        return [body for p, status, body, _ in self.attempts if p == path and status == 200]


Answer = Callable[[str, int], Awaitable[int]]  # (path, attempt number on that path) -> status


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[Answer], Awaitable[Receiver]]]:
    runners: list[tuple[web.AppRunner, Receiver]] = []

    async def start(answer: Answer) -> Receiver:
        rec = Receiver("")  # its url once it listens
        counts: dict[str, int] = {}

        async def hook(request: web.Request) -> web.Response:
            raw = await request.read()
            counts[request.path] = counts.get(request.path, 0) + 1
            status = await answer(request.path, counts[request.path])
            rec.attempts.append((request.path, status, json.loads(raw), raw))
            return web.Response(status=status)

        app = web.Application()
        app.router.add_post("/{tail:.*}", hook)
        runner, port = await serve_app(app, shutdown_timeout=1.0)
        rec.url = f"http://127.0.0.1:{port}"
        runners.append((runner, rec))
        return rec

    yield start
    for runner, rec in runners:
        rec.release.set()
        await runner.cleanup()


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> dict[str, Any]:
    async with session.request(method, url, json=body, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data


async def test_receiver_gets_exactly_the_configured_events_in_order_with_retries(
    gateway, upstreams, receiver
):
    async def answer(path: str, n: int) -> int:
        return 500 if path == "/json" and n <= 2 else 200  # the first event fails twice

    rec = await receiver(answer)
    blue, green = await upstreams("blue"), await upstreams("green")
    gw = await gateway(
        [route_config(blue.url, green.url)],
        admin={"listen": "127.0.0.1:0", "token": TOKEN},
        notifications=[
            {
                "name": "audit",
                "url": rec.url + "/json",
                "events": ["weights", "rollout.start", "rollout.abort"],
                "retries": 3,
                "backoff": "20ms",
                "timeout": "2s",
            },
            {"name": "chat", "url": rec.url + "/slack", "events": ["rollout.*"], "format": "slack"},
        ],
    )
    api = f"{gw.admin_url}/api/v1"
    async with aiohttp.ClientSession() as s:
        await call(s, "PUT", f"{api}/routes/shop/weights", {"blue": 90, "green": 10})
        await call(s, "POST", f"{api}/reload")  # not configured for either receiver
        await call(s, "POST", f"{api}/routes/shop/rollout", {"canary": "green"})
        await call(s, "POST", f"{api}/routes/shop/rollout/pause")
        await call(s, "POST", f"{api}/routes/shop/rollout/abort")
        await call(s, "PUT", f"{api}/routes/shop/weights", {"blue": 100, "green": 0})
        await wait_until(
            lambda: len(rec.delivered("/json")) == 4 and len(rec.delivered("/slack")) == 3, 10.0
        )
        await asyncio.sleep(0.2)  # nothing more arrives
        async with s.get(f"{gw.admin_url}/metrics") as resp:
            metrics = await resp.text()

    audit = rec.delivered("/json")
    assert [e["action"] for e in audit] == ["weights", "rollout.start", "rollout.abort", "weights"]
    assert [e["id"] for e in audit] == sorted(e["id"] for e in audit)
    assert audit[0]["after"]["weights"] == {"blue": 90, "green": 10}
    json_attempts = [(status, body["id"]) for p, status, body, _ in rec.attempts if p == "/json"]
    first = audit[0]["id"]
    assert json_attempts[:3] == [(500, first), (500, first), (200, first)]  # retried, in order
    assert len(json_attempts) == 6

    chat = [body["text"] for body in rec.delivered("/slack")]
    assert [t.split(": ")[1].split(" by ")[0] for t in chat] == [
        "rollout.start",
        "rollout.pause",
        "rollout.abort",
    ]
    assert len(rec.attempts) == 9  # exactly: 6 to /json, 3 to /slack
    assert not any(TOKEN.encode() in raw for *_, raw in rec.attempts)  # no secret leaves
    assert 'graygate_notifications_delivered_total{notification="audit"} 4.0' in metrics
    assert 'graygate_notifications_delivered_total{notification="chat"} 3.0' in metrics
    assert 'graygate_notifications_dropped_total{notification="audit"} 0.0' in metrics


async def test_a_hanging_receiver_does_not_delay_weight_changes(gateway, upstreams, receiver):
    async def hang(path: str, n: int) -> int:
        await rec.release.wait()
        return 200

    rec = await receiver(hang)
    blue, green = await upstreams("blue"), await upstreams("green")
    routes = [route_config(blue.url, green.url)]
    baseline = await gateway(routes)
    hooked = await gateway(
        routes, notifications=[{"url": rec.url + "/hook", "timeout": "30s", "retries": 0}]
    )
    times: dict[str, list[float]] = {"baseline": [], "hooked": []}
    async with aiohttp.ClientSession() as s:
        for i in range(30):  # interleaved, so machine noise hits both alike
            green_w = 10 if i % 2 == 0 else 20
            for name, gw in (("baseline", baseline), ("hooked", hooked)):
                t0 = time.perf_counter()
                await call(
                    s, "PUT", f"{gw.admin_url}/api/v1/routes/shop/weights",
                    {"blue": 100 - green_w, "green": green_w},
                )  # fmt: skip
                times[name].append(time.perf_counter() - t0)
    assert len(rec.attempts) == 0 and not rec.release.is_set()  # the receiver is stuck
    assert hooked.app.notifier is not None
    queued = hooked.app.notifier.sinks[0].queue.qsize()
    assert queued == 29  # one in flight, the rest waiting; none lost
    base, hook = statistics.median(times["baseline"]), statistics.median(times["hooked"])
    print(
        f"PUT weights median: baseline {base * 1000:.2f} ms, hanging receiver {hook * 1000:.2f} ms"
    )
    assert hook - base < 0.010


async def test_a_full_queue_drops_and_counts(receiver):
    async def hang(path: str, n: int) -> int:
        await rec.release.wait()
        return 200

    rec = await receiver(hang)
    notifier = Notifier((NotificationConfig("slow", rec.url, timeout=30.0),), queue_size=2)
    notifier.start()
    log = EventLog()
    log.subscribe(notifier.offer)
    registry = CollectorRegistry()
    registry.register(NotificationCollector(notifier.rows))
    try:
        for _ in range(5):  # no await in between: the sink's task has taken nothing yet
            log.append("shop", "test", "weights", None, None)
        assert (
            registry.get_sample_value(
                "graygate_notifications_dropped_total", {"notification": "slow"}
            )
            == 3.0
        )
    finally:
        await notifier.close()
    # At shutdown what was still queued counts as dropped too.
    dropped = registry.get_sample_value(
        "graygate_notifications_dropped_total", {"notification": "slow"}
    )
    assert dropped is not None and dropped >= 4.0
