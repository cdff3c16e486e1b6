"""Webhook notifications (`notifications:`): each event whose action matches a sink's
patterns is queued for that sink (bounded; a full queue drops the event and counts it) and
POSTed by the sink's own task with bounded retries and backoff, so a slow receiver never
delays the controller, the admin API or another sink. Payloads carry the event only (no
token, no webhook URL); logs name the receiver's host, never its URL (it may hold a secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import aiohttp

from proxy import __version__
from proxy.control.store.events import Event, json_safe
from proxy.core.config.model import NotificationConfig

logger = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # events waiting per sink; beyond this they are dropped and counted
MAX_BACKOFF = 30.0
USER_AGENT = f"graygate/{__version__}"


def safe_host(url: str) -> str:
    """scheme://host[:port] of a webhook URL: what logs and `graygate check` may show."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], seconds: float
) -> tuple[int | None, str | None]:
    """POST `body`; (status, None) for any answer, (None, why) for none within `seconds`.
    The reason never quotes the URL."""
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=seconds), allow_redirects=False
        ) as resp:
            return resp.status, None
    except TimeoutError:
        return None, f"no answer within {seconds:g}s"
    except aiohttp.ClientConnectorError as exc:
        return None, f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return None, type(exc).__name__


def summary(event: Event) -> str:
    """One line for people (the Slack text)."""
    where = f"route {event.route}" if event.route else "graygate"
    text = f"{where}: {event.action} by {event.actor}"
    if event.reason:
        text += f": {event.reason}"
    after = event.after or {}
    weights = after.get("weights")
    if isinstance(weights, dict) and weights:
        text += " (weights " + " ".join(f"{v}={w}" for v, w in weights.items()) + ")"
    return text


def payload(event: Event, fmt: str) -> dict[str, Any]:
    if fmt == "slack":
        return {"text": f"graygate {summary(event)}"}
    body: dict[str, Any] = json_safe(event.to_json())
    return {"source": "graygate", **body, "text": summary(event)}


@dataclass
class SinkCounts:
    delivered: int = 0
    failed: int = 0  # given up after every retry
    dropped: int = 0  # queue full, or still queued at a reload or shutdown


class Sink:
    def __init__(self, config: NotificationConfig, counts: SinkCounts, queue_size: int) -> None:
        self.config = config
        self.counts = counts
        self.host = safe_host(config.url)
        self.queue: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self.dropping = False  # warn once per run of drops, not once per event
        self.task: asyncio.Task[None] | None = None

    def matches(self, action: str) -> bool:
        return any(fnmatchcase(action, pattern) for pattern in self.config.events)


class Notifier:
    """Owns the sinks, their tasks and one HTTP session; `offer` is the EventLog listener."""

    def __init__(
        self, configs: tuple[NotificationConfig, ...], queue_size: int = QUEUE_SIZE
    ) -> None:
        self.queue_size = queue_size
        self.counts: dict[str, SinkCounts] = {}  # by name; kept across reloads (counters)
        self.sinks: list[Sink] = []
        self._session: aiohttp.ClientSession | None = None
        self._configs = configs

    def start(self) -> None:
        self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
        self._start_sinks(self._configs)

    def _start_sinks(self, configs: tuple[NotificationConfig, ...]) -> None:
        loop = asyncio.get_running_loop()
        self.sinks = []
        for c in configs:
            sink = Sink(c, self.counts.setdefault(c.name, SinkCounts()), self.queue_size)
            sink.task = loop.create_task(self._deliver(sink))
            self.sinks.append(sink)

    async def reconfigure(self, configs: tuple[NotificationConfig, ...]) -> None:
        """A reload: unchanged sinks keep running; otherwise the old ones stop (what they
        still held counts as dropped) and the new ones start."""
        if configs == self._configs:
            return
        self._configs = configs
        await self._stop_sinks()
        self._start_sinks(configs)

    def offer(self, event: Event) -> None:
        """Queue `event` for every sink that wants it; never blocks, never raises."""
        for sink in self.sinks:
            if not sink.matches(event.action):
                continue
            try:
                sink.queue.put_nowait(event)
            except asyncio.QueueFull:
                sink.counts.dropped += 1
                if not sink.dropping:
                    sink.dropping = True
                    logger.warning(
                        "notification %s to %s: queue full (%d), dropping events",
                        sink.config.name,
                        sink.host,
                        self.queue_size,
                    )
            else:
                sink.dropping = False

    def rows(self) -> list[tuple[str, SinkCounts]]:
        return list(self.counts.items())

    async def _deliver(self, sink: Sink) -> None:
        while True:
            event = await sink.queue.get()
            await self._send(sink, event)

    async def _send(self, sink: Sink, event: Event) -> None:
        assert self._session is not None
        c = sink.config
        body = payload(event, c.format)
        delay = c.backoff
        why = ""
        for attempt in range(c.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            status, error = await post_json(self._session, c.url, body, c.timeout)
            if status is not None and 200 <= status < 300:
                sink.counts.delivered += 1
                return
            why = f"answered {status}" if status is not None else str(error)
            logger.debug("notification %s event %d: %s", c.name, event.id, why)
        sink.counts.failed += 1
        logger.warning(
            "notification %s to %s: event %d (%s) not delivered after %d attempts: %s",
            c.name,
            sink.host,
            event.id,
            event.action,
            c.retries + 1,
            why,
        )

    async def _stop_sinks(self) -> None:
        for sink in self.sinks:
            if sink.task is not None:
                sink.task.cancel()
        for sink in self.sinks:
            if sink.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sink.task
            sink.counts.dropped += sink.queue.qsize()
        self.sinks = []

    async def close(self) -> None:
        await self._stop_sinks()
        if self._session is not None:
            await self._session.close()
            self._session = None
