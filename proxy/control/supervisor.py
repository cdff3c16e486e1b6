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
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.control.store.events import EventLog
from proxy.core import figures
from proxy.core.config import Config
from proxy.core.state import PolicyStore, RoutingPolicy
from proxy.core.stats import Stats
from proxy.dataplane.channel import (
    Ack,
    Channel,
    Drain,
    EndpointRow,
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
REAP_TIMEOUT = 2.0  # after its channel closed, a worker gets this long to exit, then SIGKILL
RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0)  # between attempts when a new worker fails to start


class SupervisorError(Exception):
    """The workers cannot start; the message names the cause (one line)."""


class WorkerProcess:
    """One worker child as the supervisor sees it."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        self.index = index  # its slot in Supervisor.workers; -1 while it is the standby
        self.proc = proc
        self.pid = proc.pid
        self.channel: Channel | None = None
        # Ready, or the one-line reason it never will be (no exception left unretrieved).
        self.ready: asyncio.Future[Ready | str] = asyncio.get_running_loop().create_future()
        self.up = False  # was given a slot and served: its death means a restart
        self.serving = False  # counted by settle(): accepting with a known policy
        self.acked = -1  # the policy generation it has applied
        self.inflight: dict[figures.Pair, int] = {}
        self.endpoints: list[EndpointRow] | None = None
        self.kill_reason: str | None = None
        self.lost_at = 0.0

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid})" if self.index >= 0 else f"standby {self.pid}"

    def send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)


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
    ) -> None:
        self.config = config
        self.count = config.workers
        self.store = store
        self.stats = stats
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
        self._waiters: list[asyncio.Future[None]] = []
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
        for w in launched:
            self.workers[w.index] = w
        await asyncio.gather(*(self.wait_ready(w) for w in launched))
        for w in launched:
            self.serve(w)
        pids = ", ".join(str(w.pid) for w in launched)
        logger.info("%d workers serving on %s: pids %s", self.count, self.address, pids)
        self._task(self.keep_standby())

    def reserve(self) -> None:
        """Bind (never listen) the port with SO_REUSEPORT: a port in use fails here, port 0
        becomes one concrete port for every worker, and no stranger takes it meanwhile."""
        listen = self.config.listen
        try:
            infos = socket.getaddrinfo(
                listen.host or None,
                listen.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            port = listen.port
            seen: set[tuple[int, object]] = set()
            for family, kind, proto, _, addr in infos:
                if (family, addr[0]) in seen:
                    continue
                seen.add((family, addr[0]))
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                port = port or int(sock.getsockname()[1])
        except OSError as exc:
            self.close_sockets()
            raise SupervisorError(f"listen: cannot bind {listen}: {exc}") from exc
        self.port = port
        names = []
        for sock in self.sockets:
            host = sock.getsockname()[0]
            names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
        self.address = ", ".join(names)

    async def launch(self, index: int) -> WorkerProcess:
        """A new worker process with its channel and Hello; it is bound, not yet serving."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        argv = [
            sys.executable,
            "-m",
            "proxy.dataplane.worker",
            "--channel-fd",
            str(child.fileno()),
            "--parent",
            str(os.getpid()),
            "--log-level",
            str(level),
        ]
        try:
            # fork + exec takes a few ms; a worker does not start often enough to need a
            # thread (asyncio's own subprocess support forks in the loop thread as well).
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            parent.close()
            raise SupervisorError(f"workers: cannot start {sys.executable}: {exc}") from exc
        finally:
            child.close()
        w = WorkerProcess(index, proc)
        if index < 0:
            self.standby = w  # from now on it gets every Policy, like the others
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
            self.kill(w)
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
            delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
            if delay:
                await asyncio.sleep(delay)
            attempt += 1
            try:
                w = await self.launch(-1)
                await self.wait_ready(w)
            except SupervisorError as exc:
                logger.error("standby worker failed to start: %s", exc)
                if self.standby is not None:
                    await self.reap(self.standby)
                    self.standby = None
                continue
            logger.info("standby worker ready: pid %d", w.pid)

    # -- the channel ------------------------------------------------------------------------
    def on_message(self, w: WorkerProcess, message: Message) -> None:
        if isinstance(message, Figures):
            figures.merge(self.stats, message.versions)
            w.inflight = figures.inflight_of(message.versions)
            figures.set_inflight(self.stats, self._inflight_reports())
            if message.endpoints is not None:
                w.endpoints = message.endpoints
        elif isinstance(message, Ack):
            if message.error is not None:
                self.restart(w, f"could not apply policy {message.seq}: {message.error}")
            else:
                w.acked = max(w.acked, message.seq)
            self._wake()
        elif isinstance(message, Ready):
            if not w.ready.done():
                w.ready.set_result(message)
        elif isinstance(message, Failed) and not w.ready.done():
            w.ready.set_result(message.message)

    def on_lost(self, w: WorkerProcess) -> None:
        w.serving = False
        w.lost_at = time.monotonic()
        w.inflight = {}
        figures.set_inflight(self.stats, self._inflight_reports())
        if not w.ready.done():
            w.ready.set_result(f"workers: {w.name} exited while starting; see its log above")
        self._wake()
        if self.stopping:
            return
        if w is self.standby and w.ready.done() and isinstance(w.ready.result(), Ready):
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
        deadline = self.loop.time() + self.ack_deadline
        while True:
            late = [w for w in self.workers if w is not None and w.serving and w.acked < generation]
            if not late:
                return
            left = deadline - self.loop.time()
            if left <= 0:
                for w in late:
                    self.restart(
                        w,
                        f"did not acknowledge policy {generation} within {self.ack_deadline:g}s",
                    )
                # Gone, not only signalled: its listener has left the SO_REUSEPORT group,
                # so no connection made after our answer can reach it.
                await asyncio.gather(*(self.reap(w) for w in late))
                return
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _inflight_reports(self) -> list[dict[figures.Pair, int]]:
        return [w.inflight for w in self.workers if w is not None]

    # -- faults -----------------------------------------------------------------------------
    def restart(self, w: WorkerProcess, reason: str) -> None:
        """Kill a worker that cannot be trusted with the current policy; on_lost replaces it."""
        if not w.serving:
            return
        logger.error("%s %s: restarting it", w.name, reason)
        w.kill_reason = reason
        w.serving = False
        self.kill(w)

    def kill(self, w: WorkerProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)

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
            delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
            if delay:
                await asyncio.sleep(delay)
            attempt += 1
            try:
                new = await self.launch(old.index)
            except SupervisorError as exc:
                logger.error("worker %d: restart failed: %s", old.index, exc)
                continue
            self.workers[old.index] = new
            try:
                await self.wait_ready(new)
            except SupervisorError as exc:
                logger.error("worker %d: restart failed: %s", old.index, exc)
                await self.reap(new)
                continue
            self.serve(new)
            await self.restarted(old, new)
            return

    async def restarted(self, old: WorkerProcess, new: WorkerProcess) -> None:
        """Count, log and record the restart (once the new one serves), reap the old one."""
        seconds = time.monotonic() - old.lost_at
        code = await self.reap(old)
        why = old.kill_reason or _exit_text(code)
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
        code = await self.reap(w)
        logger.warning("standby %d %s; starting another", w.pid, _exit_text(code))
        await self.keep_standby()

    async def reap(self, w: WorkerProcess, within: float = REAP_TIMEOUT) -> int | None:
        """Its exit status; SIGKILL when it has not exited `within` seconds."""
        deadline = time.monotonic() + within
        while (code := w.proc.poll()) is None:
            if time.monotonic() > deadline:
                self.kill(w)
                deadline = time.monotonic() + within
            await asyncio.sleep(0.01)
        return code

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
        codes = [await self.reap(w, within=1.0) for w in live]
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
                self.kill(w)
            await self.reap(w, within=1.0)
            if w.channel is not None:
                w.channel.close()
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def endpoint_states(self) -> list[EndpointRow]:
        """An endpoint counts as available only while every serving worker that reported
        finds it so (each worker ejects on its own traffic)."""
        merged: dict[tuple[str, str, str], bool] = {}
        for w in self.workers:
            if w is None or not w.serving or w.endpoints is None:
                continue
            for route, version, url, available in w.endpoints:
                key = (route, version, url)
                merged[key] = merged.get(key, True) and available
        if not merged:  # before the first report
            for rc in self.store.config.routes:
                for v in rc.versions:
                    for ep in v.endpoints:
                        merged[(rc.name, v.name, ep.url)] = True
        return [(r, v, u, a) for (r, v, u), a in merged.items()]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "disappeared"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


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
