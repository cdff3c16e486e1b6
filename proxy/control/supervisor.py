"""`workers: N`: the supervisor runs N data-plane workers (proxy.dataplane.worker) on one
SO_REUSEPORT port, sends each policy change to all and waits for their acknowledgements
(read-your-writes), merges their batched figures into the one Stats, restarts a worker that
dies or stalls, and drains them all on shutdown. Lives in the control-plane process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.control import children
from proxy.control.children import SupervisorError, WorkerProcess
from proxy.control.reports import WorkerReports
from proxy.control.store.events import EventLog
from proxy.core.config.model import Config
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyStore, RoutingPolicy
from proxy.core.stats import Stats
from proxy.dataplane.channel import (
    Ack,
    Channel,
    Drain,
    Failed,
    Figures,
    Hello,
    Message,
    Policy,
    Ready,
    Serve,
)

logger = logging.getLogger(__name__)

ACK_DEADLINE = 2.0  # a serving worker that has not applied a change by then is restarted
FLUSH_INTERVAL = 0.1  # workers send their figures this often (at most 250 ms: issue 10)
START_TIMEOUT = 20.0  # python start-up, imports and bind, on a busy machine
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)  # between attempts when a new worker fails to start


class Supervisor:
    """N serving workers plus one warm standby: started, bound and fed every policy like the
    others but not accepting, so a dead worker's slot serves again within milliseconds
    instead of a Python start-up (0.2-1 s on a busy machine)."""

    def __init__(
        self,
        config: Config,
        store: PolicyStore,
        stats: Stats,
        events: EventLog,
        persist: Callable[[], None],
        ack_deadline: float = ACK_DEADLINE,
        flush_interval: float = FLUSH_INTERVAL,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.config = config
        self.count = config.workers
        self.store = store
        self.events = events
        self.persist = persist
        self.ack_deadline = ack_deadline
        self.flush_interval = flush_interval
        self.loop = asyncio.get_running_loop()
        self.workers: list[WorkerProcess | None] = [None] * self.count
        self.standby: WorkerProcess | None = None
        self.restarts = 0
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self.port = 0
        self.address = ""
        self._sent_config = store.policy.config
        self.reports = WorkerReports(stats, mirrors, store, self.workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting_standby = False
        store.subscribe(self.on_policy)

    def children(self) -> list[WorkerProcess]:
        found = [w for w in self.workers if w is not None]
        return found + ([self.standby] if self.standby is not None else [])

    # -- start ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Launch every worker (reserve() first) and return once all of them serve; the
        standby starts in the background."""
        launched = [await self.launch(i) for i in range(self.count)]
        await asyncio.gather(*(self.wait_ready(w) for w in launched))
        for w in launched:
            self.serve(w)
        pids = ", ".join(str(w.pid) for w in launched)
        logger.info("%d workers serving on %s: pids %s", self.count, self.address, pids)
        self._task(self.keep_standby())

    def reserve(self) -> None:
        self.sockets, self.port, self.address = children.reserve(self.config.listen)

    async def launch(self, index: int) -> WorkerProcess:
        """A new worker process with its channel and Hello; it is bound, not yet serving."""
        w, parent = children.spawn(index)
        # Registered before the first await: from now on it gets every Policy.
        if index < 0:
            self.standby = w
        else:
            self.workers[index] = w
        _, w.channel = await self.loop.connect_accepted_socket(
            lambda: Channel(
                functools.partial(self.on_message, w), functools.partial(self.on_lost, w)
            ),
            sock=parent,
        )
        policy = self.store.policy  # after the await: no generation falls between
        states = {rp.name: rp.state for rp in policy.routes}
        w.send(Hello(policy.config, states, policy.generation, self.port, self.flush_interval))
        return w

    async def wait_ready(self, w: WorkerProcess) -> None:
        try:
            ready = await asyncio.wait_for(asyncio.shield(w.ready), START_TIMEOUT)
        except TimeoutError:
            w.kill()
            raise SupervisorError(f"workers: {w.name} not ready after {START_TIMEOUT:g}s") from None
        if isinstance(ready, str):
            raise SupervisorError(ready)

    def serve(self, w: WorkerProcess) -> None:
        # Every Policy sent so far precedes Serve on the channel: once the worker accepts,
        # it has applied the current generation.
        w.send(Serve())
        w.up = w.serving = True
        w.acked = max(w.acked, self.store.policy.generation)

    async def keep_standby(self) -> None:
        if self._starting_standby:
            return  # one at a time: two restarts at once need one new standby
        self._starting_standby = True
        try:
            await self._start_standby()
        finally:
            self._starting_standby = False

    async def _start_standby(self) -> None:
        attempt = 0
        while not self.stopping and self.standby is None:
            await backoff(attempt)
            attempt += 1
            try:
                w = await self.launch(-1)
                await self.wait_ready(w)
            except SupervisorError as exc:
                logger.error("standby worker failed to start: %s", exc)
                if self.standby is not None:
                    await self.standby.reap()
                    self.standby = None
                continue
            logger.info("standby worker ready: pid %d", w.pid)

    # -- the channel ------------------------------------------------------------------------
    def on_message(self, w: WorkerProcess, message: Message) -> None:
        if isinstance(message, Figures):
            self.reports.merge(w, message)
        elif isinstance(message, Ack):
            if message.error is not None:
                reason = f"could not apply policy {message.seq}: {message.error}"
                if w.serving:
                    self.restart(w, reason)
                else:  # a standby or a starting worker must never serve it either
                    logger.error("%s %s: stopping it", w.name, reason)
                    w.kill_reason = reason
                    w.kill()
            else:
                w.acked = max(w.acked, message.seq)
            self.reports.wake()
        elif isinstance(message, Ready):
            if not w.ready.done():
                w.ready.set_result(message)
        elif isinstance(message, Failed) and not w.ready.done():
            w.ready.set_result(message.message)

    def on_lost(self, w: WorkerProcess) -> None:
        w.serving = False
        w.lost_at = time.monotonic()
        self.reports.lost(w)
        if not w.ready.done():
            w.ready.set_result(f"workers: {w.name} exited while starting; see its log above")
        self.reports.wake()
        if self.stopping:
            return
        if w is self.standby and w.is_ready:
            self.standby = None
            self._task(self.standby_lost(w))
        elif w.up and self.workers[w.index] is w:
            self.replace(w)

    def on_policy(self, policy: RoutingPolicy) -> None:
        """Every generation to every worker, in order; the config only when it changed."""
        config = policy.config if policy.config is not self._sent_config else None
        self._sent_config = policy.config
        message = Policy(policy.generation, {rp.name: rp.state for rp in policy.routes}, config)
        for w in self.children():
            w.send(message)

    async def settle(self, generation: int) -> None:
        """Return once every serving worker has applied `generation`; a worker that has not
        within the deadline is killed (and its slot served by the standby)."""
        late = await self.reports.late(generation, self.ack_deadline)
        if late:
            for w in late:
                reason = f"did not acknowledge policy {generation} within {self.ack_deadline:g}s"
                self.restart(w, reason)
            # Gone, not only signalled: its listener has left the SO_REUSEPORT group,
            # so no connection made after our answer can reach it.
            await asyncio.gather(*(w.reap() for w in late))

    # -- faults -----------------------------------------------------------------------------
    def restart(self, w: WorkerProcess, reason: str) -> None:
        """Kill a worker that cannot be trusted with the current policy; on_lost replaces it."""
        if not w.serving:
            return
        logger.error("%s %s: restarting it", w.name, reason)
        w.kill_reason = reason
        w.serving = False
        w.kill()

    def replace(self, old: WorkerProcess) -> None:
        """The dead worker's slot goes to the standby at once when it is ready (same loop
        turn as the EOF); otherwise a new process is started for it."""
        standby = self.standby
        if (
            standby is not None
            and standby.ready.done()
            and isinstance(standby.ready.result(), Ready)
        ):
            self.standby = None
            standby.index = old.index
            self.workers[old.index] = standby
            self.serve(standby)
            self._task(self.restarted(old, standby))
        else:
            self._task(self.cold_restart(old))

    async def cold_restart(self, old: WorkerProcess) -> None:
        attempt = 0
        while not self.stopping:
            await backoff(attempt)
            attempt += 1
            try:
                new = await self.launch(old.index)
            except SupervisorError as exc:
                logger.error("worker %d: restart failed: %s", old.index, exc)
                continue
            try:
                await self.wait_ready(new)
            except SupervisorError as exc:
                logger.error("worker %d: restart failed: %s", old.index, exc)
                await new.reap()
                continue
            self.serve(new)
            await self.restarted(old, new)
            return

    async def restarted(self, old: WorkerProcess, new: WorkerProcess) -> None:
        """Count, log and record the restart (once the new one serves), reap the old one."""
        seconds = time.monotonic() - old.lost_at
        code = await old.reap()
        why = old.kill_reason or children.exit_text(code)
        self.restarts += 1
        flush_ms = round(self.flush_interval * 1000)
        logger.warning("%s %s; pid %d serves its slot after %.3fs", old.name, why, new.pid, seconds)
        self.events.append(
            None,
            "supervisor",
            "worker.restart",
            {"worker": old.index, "pid": old.pid},
            {"worker": new.index, "pid": new.pid},
            f"{old.name} {why}; figures it had not flushed (at most its last {flush_ms} ms) "
            "are lost",
            {"restart_seconds": round(seconds, 3), "exit": code},
        )
        with contextlib.suppress(OSError):  # the store keeps the event; the next save has it
            self.persist()
        await self.keep_standby()

    async def standby_lost(self, w: WorkerProcess) -> None:
        code = await w.reap()
        logger.warning("standby %d %s; starting another", w.pid, children.exit_text(code))
        await self.keep_standby()

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the end ----------------------------------------------------------------------------
    async def stop(self, grace: float) -> None:
        """Drain every worker: each stops accepting, finishes what it has up to `grace`,
        sends its last figures and exits; one that overstays by 5 s is killed."""
        self.stopping = True
        live = [w for w in self.children() if w.channel is not None]
        for w in live:
            w.send(Drain(grace))
        lost = [w.channel.lost for w in live if w.channel is not None]
        if lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*lost), grace + 5.0)
        codes = [await w.reap(within=1.0) for w in live]
        unclean = [(w.pid, c) for w, c in zip(live, codes, strict=True) if c != 0]
        if unclean:
            logger.warning("workers that did not exit cleanly: %s", unclean)

    async def close(self) -> None:
        """Last resort (and the start-failure path): no worker outlives the supervisor."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for w in self.children():
            if w.proc.poll() is None:
                w.kill()
            await w.reap(within=1.0)
            if w.channel is not None:
                w.channel.close()
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


async def backoff(attempt: int) -> None:
    """The pause before start attempt `attempt` of a worker (none before the first)."""
    delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
    if delay:
        await asyncio.sleep(delay)


def read_your_writes(store: PolicyStore, settle: Callable[[int], Awaitable[None]]) -> Middleware:
    """Admin middleware: a call that changed the policy answers only after every worker
    applied it. Innermost, so a refused call (an ApiError) never waits."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            await settle(store.policy.generation)
        return response

    return middleware
