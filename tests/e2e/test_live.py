"""Issue acceptance: live weight changes under load. 64 keep-alive clients drive the
in-process gateway for 10 s while the admin API changes the weights every 50 ms: no request
fails, and the requests that were routed under one policy follow that policy's weights.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from tests.helpers import route_config

CLIENTS = 64
DURATION = 10.0
CHANGE_EVERY = 0.05
# Ordered so that every kind of jump happens: all-green -> all-blue, all-blue -> half, ...
CYCLE = [(0, 100), (100, 0), (50, 50), (90, 10)]
SIGMA = 4.5


@dataclass(frozen=True)
class Change:
    sent: float  # PUT written: the old policy holds at least until here
    answered: float  # PUT answered: the new policy holds from here on
    weights: tuple[int, int]  # (blue, green)
    status: int
    revision: int | None


@dataclass(frozen=True)
class Result:
    rid: str
    start: float
    end: float
    status: int
    version: str | None
    body: str


async def test_weight_changes_every_50ms_under_load(upstreams, gateway) -> None:
    received: dict[str, float] = {}  # request id -> when the upstream got it

    def answer_as(name: str):
        async def handler(request: web.Request) -> web.Response:
            received[request.headers["X-Req"]] = time.monotonic()
            return web.Response(text=name)

        return handler

    blue = await upstreams("blue", answer_as("blue"))
    green = await upstreams("green", answer_as("green"))
    gw = await gateway(
        routes=[route_config(blue.url, green.url)],  # no sticky: a weighted choice per request
        timeouts={"connect": "500ms", "read": "2s", "request": "3s"},
    )
    weights_url = gw.admin_url + "/api/v1/routes/shop/weights"

    results: list[Result] = []
    failures: list[str] = []
    changes: list[Change] = []
    ids = itertools.count()
    stop_at = time.monotonic() + DURATION

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            rid = str(next(ids))
            start = time.monotonic()
            try:
                async with session.get(gw.url + "/live", headers={"X-Req": rid}) as r:
                    body = await r.text()
                    version = r.headers.get("X-Graygate-Version")
                    results.append(Result(rid, start, time.monotonic(), r.status, version, body))
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"request {rid}: {exc!r}")

    async def changer() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as admin:
            for k in itertools.count():
                if time.monotonic() >= stop_at:
                    return
                b, g = CYCLE[k % len(CYCLE)]
                sent = time.monotonic()
                async with admin.put(weights_url, json={"blue": b, "green": g}) as r:
                    data = await r.json()
                answered = time.monotonic()
                state = data.get("state", {})
                ok = r.status == 200 and state.get("weights") == {"blue": b, "green": g}
                changes.append(
                    Change(sent, answered, (b, g), r.status if ok else -1, state.get("revision"))
                )
                await asyncio.sleep(CHANGE_EVERY)

    connector = aiohttp.TCPConnector(limit=CLIENTS, limit_per_host=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.wait_for(
            asyncio.gather(changer(), *(client(session) for _ in range(CLIENTS))),
            DURATION + 10,
        )

    # ---- no failed requests, each answered by the version it names -----------------------
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:5]}"
    bad = [r for r in results if r.status != 200 or r.version not in ("blue", "green")]
    assert not bad, f"{len(bad)} bad responses, e.g. {bad[:5]}"
    wrong = [r for r in results if r.body != r.version]
    assert not wrong, f"{len(wrong)} responses from another upstream than named, e.g. {wrong[:5]}"
    missing = [r.rid for r in results if r.rid not in received]
    assert not missing, f"{len(missing)} answered requests never reached an upstream"
    assert len(results) >= 2000, f"only {len(results)} requests in {DURATION}s"

    # ---- every change applied, in order ----------------------------------------------------
    assert len(changes) >= 60, f"only {len(changes)} weight changes in {DURATION}s"
    assert all(c.status == 200 for c in changes), [c for c in changes if c.status != 200][:5]
    revisions = [c.revision for c in changes]
    assert revisions == list(range(revisions[0], revisions[0] + len(changes))), revisions[:20]

    # ---- the split under each policy ---------------------------------------------------------
    # Change i is in effect from some instant in [sent_i, answered_i] until some instant in
    # [sent_i+1, answered_i+1]. The proxy picks the version after the client starts the
    # request and before the upstream receives it, so a request with
    # answered_i <= start and upstream receipt <= sent_i+1 was routed under change i.
    starts = [c.answered for c in changes]
    ends = [c.sent for c in changes[1:]] + [math.inf]
    tally: dict[tuple[int, int], Counter[str]] = {w: Counter() for w in CYCLE}
    violations: list[str] = []
    for r in results:
        i = bisect.bisect_right(starts, r.start) - 1
        if i < 0 or received[r.rid] > ends[i]:
            continue  # routed while a change was in flight: either policy is right
        w = changes[i].weights
        tally[w][r.version] += 1
        if w in ((100, 0), (0, 100)):
            expected = "blue" if w == (100, 0) else "green"
            if r.version != expected:
                violations.append(
                    f"request {r.rid} started {r.start - starts[i]:.4f}s after weights {w} "
                    f"(revision {changes[i].revision}) were applied, answered by {r.version}"
                )
    assert not violations, f"{len(violations)} requests ignored the weights: {violations[:5]}"

    for w, counts in tally.items():
        n = counts["blue"] + counts["green"]
        assert n >= 200, f"too few requests under weights {w} to judge: {n} ({dict(tally)})"
        p_green = w[1] / 100
        if p_green in (0.0, 1.0):
            continue
        expected = n * p_green
        sigma = math.sqrt(n * p_green * (1 - p_green))
        assert abs(counts["green"] - expected) <= SIGMA * sigma, (
            f"weights {w}: {counts['green']} of {n} requests went to green, expected "
            f"{expected:.0f} +- {SIGMA * sigma:.0f}"
        )
