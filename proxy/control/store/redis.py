"""The `redis` state backend's commands (RedisStateStore): route states in one hash and
recent events in a capped list shared by every replica, compare-and-set writes, change
notices over pub/sub, and the controller lease with its fencing token, in Lua scripts so
each is one atomic step in redis. The replica's side of it is sync.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.control.store.events import Event, event_from_json, json_safe
from proxy.control.store.file import EVENTS_ON_DISK, state_from_json
from proxy.core.state import RouteState

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
# An admin call waits at most this for redis before answering 503.
COMMAND_TIMEOUT = 2.0

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
        # One immediate retry, on a broken connection only: a pooled connection that a
        # redis restart closed is replaced at once, while a down redis (refused) or a hung
        # one (timeout) surfaces at once (503, logged); the loops here retry on their own.
        self.client: aioredis.Redis = aioredis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        )
        # The subscription never reconnects silently: notices sent while it was down are
        # lost, so the replica must see the loss and re-read everything (RedisSync.follow).
        self.notices: aioredis.Redis = aioredis.from_url(
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
        self.pubsub = self.notices.pubsub(ignore_subscribe_messages=True)
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
        await self.notices.aclose()
        await self.client.aclose()
