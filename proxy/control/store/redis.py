"""The `redis` state backend: route states in one hash and recent events in a capped list
shared by every replica (RedisStateStore), and the replica side (RedisSync): changes written
to redis before they apply, other replicas' changes followed over pub/sub, the controller
lease with a fencing token, reconciling and re-seeding after redis comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.control.store.events import Event, EventLog, event_from_json, json_safe
from proxy.control.store.file import EVENTS_ON_DISK, state_from_json
from proxy.control.store.writer import Compute, LeaseLost, StateUnavailable
from proxy.core.state import PolicyError, PolicyStore, RouteState

logger = logging.getLogger(__name__)

LEASE_MS = 3000  # a crashed leader's lease runs out after this; renewed every third of it
RETRY_SECONDS = 0.5  # after a failed save or a lost subscription: reconcile well within 2 s
CONNECT_TIMEOUT = 2.0
# An admin call waits at most this for redis before answering 503.
COMMAND_TIMEOUT = 2.0
# A change that loses the compare-and-set to another replica is recomputed on the newer
# state this many times (only when the caller named no revision).
CHANGE_ATTEMPTS = 3

# Writes only routes whose stored revision is not newer than ours, so a replica that has
# not yet heard of a change cannot undo it; equal revisions: last write wins. Returns the
# refused routes (the caller re-reads them). One script: the hash, the list and the
# notification change together.
_SAVE = """
local n = tonumber(ARGV[4])
local written, refused = {}, {}
local i = 5
for _ = 1, n do
  local name, rev, doc = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  i = i + 3
  local cur = redis.call('HGET', KEYS[1], name)
  local newer = false
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    newer = ok and type(d) == 'table' and type(d['revision']) == 'number'
      and d['revision'] > rev
  end
  if newer then
    refused[#refused + 1] = name
  else
    redis.call('HSET', KEYS[1], name, doc)
    written[#written + 1] = name
  end
end
if i <= #ARGV then
  for j = i, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[j]) end
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
end
if #written > 0 then
  redis.call('PUBLISH', ARGV[1], cjson.encode({writer = ARGV[2], routes = written}))
end
return refused
"""

# One route's change, compare-and-set on its revision: written only if redis still holds
# the revision the change was computed from (or nothing: redis lost its data). A fenced
# write (the controller's) also needs the lease to hold exactly this replica's
# writer:token value, so a leader that lost the lease cannot write after its successor.
_COMMIT = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[6] then return {'fenced'} end
local cur = redis.call('HGET', KEYS[1], ARGV[3])
if cur then
  local ok, d = pcall(cjson.decode, cur)
  if ok and type(d) == 'table' and d['revision'] ~= tonumber(ARGV[4]) then
    return {'stale', cur}
  end
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[5])
redis.call('PUBLISH', ARGV[1], cjson.encode({writer = ARGV[2], routes = {ARGV[3]}}))
return {'ok'}
"""

# Renew the lease if it holds our value, else take it if free with a new fencing token
# (writer:n, n from a counter that only grows). Returns the value held, or nil.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then return false end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStateError(Exception):
    """Redis cannot be reached at start, or holds state graygate cannot read."""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisStateStore:
    """Route states in the hash `{prefix}:routes` (route -> the file store's JSON), the last
    events in the list `{prefix}:events`; every save publishes the written route names on
    `{prefix}:changes` with this writer's id."""

    def __init__(self, url: str, prefix: str, writer: str | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.writer = writer if writer is not None else uuid.uuid4().hex
        self.routes_key = f"{prefix}:routes"
        self.events_key = f"{prefix}:events"
        self.channel = f"{prefix}:changes"
        self.lease_key = f"{prefix}:lease"
        self.fence_key = f"{prefix}:fence"
        # No retries inside the client: a down redis must surface at once (503, logged),
        # and every loop here retries on its own schedule.
        self.client: aioredis.Redis = aioredis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.pubsub: Any = None
        # What this replica last wrote or adopted per route; a save writes only differences.
        self._known: dict[str, RouteState] = {}
        self._last_event = 0

    def _error(self, detail: str) -> RedisStateError:
        return RedisStateError(f"state.redis_url {self.url}: {detail}")

    async def open(self, reset: bool = False) -> tuple[dict[str, RouteState], list[Event]] | None:
        """Connect, subscribe to changes (before reading, so none is missed), then load.
        `reset` deletes the stored states and events first: start from the config."""
        try:
            await self.client.ping()
            await self.subscribe()
            if reset:
                await self.client.delete(self.routes_key, self.events_key)
                return None
            return await self.load()
        except (RedisError, OSError) as exc:
            await self.close()
            raise self._error(f"cannot reach redis ({exc})") from exc
        except RedisStateError:
            await self.close()
            raise

    async def unsubscribe(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.pubsub.aclose()
            self.pubsub = None

    async def subscribe(self) -> None:
        await self.unsubscribe()
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self.pubsub.subscribe(self.channel)

    async def load(self) -> tuple[dict[str, RouteState], list[Event]] | None:
        raw_routes = await self.client.hgetall(self.routes_key)
        raw_events = await self.client.lrange(self.events_key, 0, -1)
        if not raw_routes and not raw_events:
            return None
        try:
            states = {
                _text(k): state_from_json(_text(k), json.loads(v)) for k, v in raw_routes.items()
            }
            events = [event_from_json(json.loads(e)) for e in raw_events]
        except ValueError as exc:
            raise self._error(
                f"stored state under {self.prefix!r} is invalid ({exc}); fix or delete "
                f"{self.routes_key} and {self.events_key}, or start with --reset-state"
            ) from exc
        self._known = dict(states)
        self._last_event = max((e.id for e in events), default=0)
        return states, events

    async def load_routes(self, names: Iterable[str]) -> dict[str, RouteState]:
        """The stored states of `names`; a missing or unreadable one is left out (logged)."""
        wanted = list(names)
        if not wanted:
            return {}
        found: dict[str, RouteState] = {}
        for name, raw in zip(wanted, await self.client.hmget(self.routes_key, wanted), strict=True):
            if raw is None:
                continue
            try:
                found[name] = state_from_json(name, json.loads(raw))
            except ValueError as exc:
                logger.warning("redis %s: route %r unreadable: %s", self.routes_key, name, exc)
        return found

    async def route_names(self) -> list[str]:
        return [_text(k) for k in await self.client.hkeys(self.routes_key)]

    def remember(self, route: str, state: RouteState) -> None:
        """`state` is what redis holds for `route` (adopted from another replica)."""
        self._known[route] = state

    async def commit(
        self, route: str, expected: int, state: RouteState, fence: str = ""
    ) -> tuple[str, RouteState | None]:
        """Compare-and-set one route: ("ok", None), ("stale", what redis holds) or
        ("fenced", None) when `fence` is set and no longer the lease's value."""
        doc = json.dumps(json_safe(state.to_json()), sort_keys=True, allow_nan=False)
        keys = (self.routes_key, self.lease_key)
        args = (self.channel, self.writer, route, expected, doc, fence)
        reply = await self.client.eval(_COMMIT, 2, *keys, *args)
        outcome = _text(reply[0])
        if outcome == "ok":
            self._known[route] = state
        if outcome == "stale":
            try:
                return outcome, state_from_json(route, json.loads(reply[1]))
            except ValueError as exc:
                logger.warning("redis %s: route %r unreadable: %s", self.routes_key, route, exc)
        return outcome, None

    async def save(
        self, states: Mapping[str, RouteState], events: Sequence[Event], every: bool = False
    ) -> list[str]:
        """Write the routes changed since the last save (`every`: all of them) and the
        events not yet written, then publish the written names; returns the routes refused
        as older than stored."""
        changed = {n: s for n, s in states.items() if every or self._known.get(n) != s}
        fresh = [e for e in events if e.id > self._last_event]
        if not changed and not fresh:
            return []
        args: list[str | int] = [self.channel, self.writer, EVENTS_ON_DISK, len(changed)]
        for name, state in changed.items():
            doc = json.dumps(json_safe(state.to_json()), sort_keys=True, allow_nan=False)
            args += [name, state.revision, doc]
        for event in fresh[-EVENTS_ON_DISK:]:
            args.append(json.dumps(json_safe(event.to_json()), sort_keys=True, allow_nan=False))
        refused = await self.client.eval(_SAVE, 2, self.routes_key, self.events_key, *args)
        refused_names = {_text(r) for r in refused}
        for name, state in changed.items():
            if name not in refused_names:
                self._known[name] = state
        if fresh:
            self._last_event = fresh[-1].id
        return sorted(refused_names)

    async def hold_lease(self, ms: int, held: str = "") -> str | None:
        """Renew the lease if it still holds `held`, take it if free (a new fencing token);
        the value now held, None while another replica holds it."""
        got = await self.client.eval(
            _LEASE, 2, self.lease_key, self.fence_key, self.writer, ms, held
        )
        return _text(got) if got else None

    async def release_lease(self, held: str) -> None:
        await self.client.eval(_RELEASE, 1, self.lease_key, held)

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.unsubscribe()
        await self.client.aclose()


class RedisSync:
    """One replica's link to the shared state: `change` (a StateWriter) writes a route to
    redis before it applies here; `persist` wakes the background writer of events and of
    reload results; `follow` adopts other replicas' changes and reconciles after an outage;
    `keep_lease` decides whether this replica runs the rollout controller."""

    def __init__(
        self,
        backend: RedisStateStore,
        store: PolicyStore,
        events: EventLog,
        lease_ms: int = LEASE_MS,
    ) -> None:
        self.backend = backend
        self.store = store
        self.events = events
        self.lease_ms = lease_ms
        self._dirty = asyncio.Event()
        # Saves are serialized: the writer task and the final flush never interleave.
        self._lock = asyncio.Lock()
        self._change_lock = asyncio.Lock()  # this replica's changes, one at a time
        self._lease_until = 0.0  # monotonic; the lease counts as ours until then
        self.fence = ""  # the lease value (writer:token) last held; fenced writes carry it
        self.available = True  # the last redis call succeeded (graygate_state_store_up)
        self._resigned = False
        self.tasks: list[asyncio.Task[None]] = []
        self._lease_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._writer()))
        self.tasks.append(loop.create_task(self.follow()))
        self._lease_task = loop.create_task(self.keep_lease())
        self.tasks.append(self._lease_task)

    def persist(self) -> None:
        # Never blocks: each save writes the states current when it runs, so a burst of
        # changes collapses into one write and the last state wins.
        self._dirty.set()

    def holds_lease(self) -> bool:
        return not self._resigned and time.monotonic() < self._lease_until

    def _reached(self, ok: bool) -> None:
        if ok != self.available:
            log = logger.info if ok else logger.error
            log("redis %s: %s", self.backend.url, "reachable again" if ok else "unreachable")
        self.available = ok

    def _unavailable(self, exc: Exception) -> StateUnavailable:
        self._reached(False)
        return StateUnavailable(
            f"state store unreachable (state.redis_url {self.backend.url}: {exc}); "
            "nothing was changed"
        )

    async def check(self) -> None:
        """Raise StateUnavailable unless redis answers now (before a change that cannot be
        undone, like a reload)."""
        try:
            await self.backend.ping()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        self._reached(True)

    async def change(
        self, route: str, compute: Compute, expected: int | None = None, fenced: bool = False
    ) -> tuple[RouteState, RouteState]:
        """StateWriter: compute from this replica's state, compare-and-set it in redis, and
        only then swap it in here; other replicas adopt it from the notification."""
        async with self._change_lock:
            for _ in range(CHANGE_ATTEMPTS):
                current = self.store.state(route)
                after = self.store.prepare(route, compute(current), expected)
                if fenced and not self.holds_lease():
                    raise LeaseLost("this replica does not hold the controller lease")
                try:
                    outcome, stored = await self.backend.commit(
                        route, current.revision, after, self.fence if fenced else ""
                    )
                except (RedisError, OSError) as exc:
                    raise self._unavailable(exc) from exc
                self._reached(True)
                if outcome == "ok":
                    # A newer state may have been adopted while the write was in flight.
                    if self.store.state(route).revision < after.revision:
                        after = self.store.adopt(route, after)
                    return current, after
                if outcome == "fenced":
                    self._lease_until = 0.0
                    raise LeaseLost("the controller lease moved to another replica")
                if stored is not None:
                    self._adopt(route, stored)
                if expected is not None or fenced:
                    break  # the caller judged a revision that is gone: let it look again
            state = self.store.state(route)
            raise PolicyError(
                "stale_revision",
                f"route {route!r} changed on another replica (now revision {state.revision})",
                "If-Match",
                status=409,
            )

    async def flush(self) -> None:
        """Write what is not yet in redis now; StateUnavailable when it cannot."""
        try:
            async with self._lock:
                await self._save()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def _save(self) -> None:
        refused = await self.backend.save(self.store.states(), self.events.since(0))
        if refused:
            logger.info("redis: routes %s changed on another replica; re-reading", refused)
            await self._pull(refused)

    async def _writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                async with self._lock:
                    await self._save()
            except (RedisError, OSError) as exc:
                self._reached(False)
                logger.error("redis: events not saved (%s); retrying in %gs", exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    def _adopt(self, name: str, state: RouteState) -> None:
        try:
            local = self.store.state(name)
        except KeyError:
            return  # a route this replica's config does not have
        # A local state with a higher revision is a change of ours not yet saved.
        if state.revision < local.revision or state == local:
            return
        try:
            adopted = self.store.adopt(name, state)
        except PolicyError as exc:
            logger.warning("redis: route %s from another replica refused: %s", name, exc)
            return
        self.backend.remember(name, adopted)

    async def _pull(self, names: Iterable[str]) -> None:
        for name, state in (await self.backend.load_routes(names)).items():
            self._adopt(name, state)

    async def reconcile(self) -> None:
        """After redis was unreachable: adopt what is newer there, and re-seed the routes it
        no longer holds (restarted empty) from the newest revision held here."""
        stored = set(await self.backend.route_names())
        ours = self.store.states()
        await self._pull(n for n in ours if n in stored)
        missing = {n: s for n, s in ours.items() if n not in stored}
        if not missing:
            return
        async with self._lock:
            refused = set(await self.backend.save(missing, (), every=True))
        for name, state in missing.items():
            if name in refused:
                continue  # another replica re-seeded it first, with a newer revision
            logger.warning("redis: held no state for route %s; re-seeded it", name)
            self.events.append(
                name,
                f"replica:{self.backend.writer[:12]}",
                "state.reseed",
                None,
                state.to_json(),
                f"redis held no state for route {name!r}; re-seeded from revision "
                f"{state.revision} held by this replica",
            )
        self.persist()

    async def follow(self) -> None:
        """Adopt what other replicas publish; after a lost subscription, resubscribe and
        reconcile every route (notifications sent meanwhile are gone)."""
        while True:
            try:
                if self.backend.pubsub is None:
                    await self.backend.subscribe()
                    await self.reconcile()
                    self._reached(True)
                await self._listen()
            except (RedisError, OSError) as exc:
                if self.available:
                    logger.warning("redis: subscription lost (%s); resubscribing", exc)
                self._reached(False)
                await self.backend.unsubscribe()
                await asyncio.sleep(RETRY_SECONDS)

    async def _listen(self) -> None:
        while True:
            message = await self.backend.pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            try:
                data = json.loads(message["data"])
                writer, routes = data["writer"], data["routes"]
            except (ValueError, KeyError, TypeError):
                logger.warning("redis: unreadable change notice %r", message.get("data"))
                continue
            if writer == self.backend.writer or not isinstance(routes, list):
                continue
            await self._pull(str(r) for r in routes)

    async def keep_lease(self) -> None:
        interval = self.lease_ms / 3000
        while True:
            asked = time.monotonic()
            try:
                value = await self.backend.hold_lease(self.lease_ms, self.fence)
            except (RedisError, OSError) as exc:
                if self.available:
                    logger.warning("redis: controller lease not renewed (%s)", exc)
                self._reached(False)
            else:
                self._reached(True)
                was = self.holds_lease()
                # Counted from before the request, with a margin: never believe in a lease
                # redis has already let go.
                self._lease_until = asked + self.lease_ms / 1000 * 0.8 if value else 0.0
                if value:
                    self.fence = value
                if bool(value) != was:
                    logger.info(
                        "redis: %s the rollout controller lease%s",
                        "took" if value else "lost",
                        f" (fencing token {value.rsplit(':', 1)[-1]})" if value else "",
                    )
            await asyncio.sleep(interval)

    async def resign(self) -> None:
        """Stop leading (shutdown): another replica takes the controller over at once."""
        self._resigned = True
        if self._lease_task is not None:
            # A renewal still in flight could take the lease again after the release.
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_task
        # Released even when not known as ours: a cancelled renewal may have taken it.
        self._lease_until = 0.0
        try:
            await self.backend.release_lease(self.fence)
        except (RedisError, OSError) as exc:
            logger.warning("redis: lease not released (%s); it runs out by itself", exc)

    async def close(self) -> None:
        """Stop the tasks, write what is left, release the lease, close the connections."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
        try:
            await self.flush()
        except StateUnavailable as exc:
            logger.error("redis: final state not saved: %s", exc)
        if not self._resigned:
            await self.resign()
        await self.backend.close()
