"""One replica's link to the shared redis state (RedisSync): changes written to redis before
they apply here (the StateWriter of the redis backend), other replicas' changes followed
over pub/sub, the controller lease kept, and after an outage a reconcile that re-seeds a
redis that came back empty. The redis commands themselves are in redis.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable

from redis.exceptions import RedisError

from proxy.control.store.events import EventLog
from proxy.control.store.redis import RedisStateStore
from proxy.control.store.writer import Compute, LeaseLost, StateUnavailable
from proxy.core.state import PolicyError, PolicyStore, RouteState

logger = logging.getLogger(__name__)

LEASE_MS = 3000  # a crashed leader's lease runs out after this; renewed every third of it
RETRY_SECONDS = 0.5  # after a failed save or a lost subscription: reconcile well within 2 s
# A change that loses the compare-and-set to another replica is recomputed on the newer
# state this many times (only when the caller named no revision).
CHANGE_ATTEMPTS = 3


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
                if outcome == "stale" and stored == after:
                    outcome = "ok"  # our write landed, its reply was lost and retried
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
        # Cancel only between saves: a save cancelled mid-command can leave redis-py's
        # connection swallowing the CancelledError, and the writer would never end.
        async with self._lock:
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
