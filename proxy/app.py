"""Wiring and lifetimes: the data-plane listener, the admin app, the state file, the
rollout controller and the housekeeping tasks; start-up, reload and the shutdown
sequence (readiness off, stop accepting, drain up to the grace period, close pools).
Owns no policy logic: every runtime change goes through PolicyStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.build import BUILD
from proxy.control.admin import make_admin_app
from proxy.control.api import AdminContext
from proxy.control.children import SupervisorError
from proxy.control.controller import Controller
from proxy.control.guard import check_admin_exposure
from proxy.control.metrics import NotificationCollector, ReplicaRow, make_registry
from proxy.control.notify import Notifier
from proxy.control.source import Sources
from proxy.control.store.events import EventLog
from proxy.control.store.file import FileStateStore, StateFileError, merge_states
from proxy.control.store.redis import RedisStateError, RedisStateStore
from proxy.control.store.sync import RedisSync
from proxy.control.store.writer import LocalWriter, StateUnavailable, StateWriter
from proxy.control.supervisor import Supervisor, read_your_writes
from proxy.core.config.load import load_config
from proxy.core.config.model import Config, ConfigError
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.listener import Listener
from proxy.dataplane.tls import server_context

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """graygate cannot start with this config or state; the message says how to fix it."""


class App:
    """Owns every resource of one graygate process. start() builds them in one place and
    pushes each one's closing step on one AsyncExitStack, so a failure part-way closes
    what was opened in reverse order, and shutdown() drains, then unwinds the same stack.
    """

    def __init__(self, config_path: str, config: Config, reset_state: bool = False) -> None:
        self.config_path = config_path
        self.config = config
        self.reset_state = reset_state
        self.draining = False
        self.serving = False  # start() finished: the final save at close is meaningful
        self.stack = contextlib.AsyncExitStack()
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.admin_runner: web.AppRunner | None = None
        self.data_address = ""
        self.admin_address = ""
        self.redis: RedisSync | None = None  # set when state.backend is redis
        self.supervisor: Supervisor | None = None  # set when workers > 1
        self.listener: Listener | None = None  # set when workers == 1: the data plane here
        self.notifier: Notifier | None = None

    async def start(self) -> None:
        """Raises StartupError (one line naming the cause); nothing stays open then."""
        try:
            await self._open()
        except BaseException as exc:
            await self.stack.aclose()
            if isinstance(exc, OSError):
                raise StartupError(f"unexpected system error: {exc}") from exc
            raise
        self.serving = True
        # Start-up objects live forever: keep them out of every later GC pass.
        gc.collect()
        gc.freeze()
        logger.info(
            "graygate serving on %s://%s, admin on http://%s, routes: %s",
            "https" if self.config.listen_tls is not None else "http",
            self.data_address,
            self.admin_address,
            ", ".join(r.name for r in self.config.routes),
        )

    async def _open(self) -> None:
        config = self.config
        try:
            check_admin_exposure(config.admin.listen.host, config.admin.token)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        await self._open_state()
        self.stats = Stats.from_config(config)
        self.mirrors = Mirrors.from_config(config)  # shadow copies: counters and mismatches
        if config.workers == 1:
            await self._open_gateway()  # the data plane in this process, as always
        else:
            self._open_supervisor()  # the port is bound (not yet served) here
        await self._open_admin()
        if self.supervisor is not None:
            await self._start_workers()
        self.sources = Sources(self.stats, self.mirrors)
        self.stack.push_async_callback(self.sources.close)
        self.controller = Controller(
            self.store,
            self.sources.for_route,
            self.writer,
            self.events,
            self.persist,
            self.stats,
            should_run=self.redis.holds_lease if self.redis is not None else None,
            mirrors=self.mirrors,
        )
        self._spawn(self.controller.run())

    async def _open_state(self) -> None:
        """The state backend, the event log and the policy store; the file is written once
        here, so an unwritable path stops the start before any port is bound."""
        config = self.config
        self.state_file = FileStateStore(config.state.path)
        loaded = None
        backend: RedisStateStore | None = None
        if config.state.backend == "redis":  # shared by replicas; see control/store/redis.py
            try:
                backend = RedisStateStore(config.state.redis_url, config.state.redis_prefix)
            except ValueError as exc:  # redis-py refuses the URL itself (port, db, scheme)
                raise StartupError(f"state.redis_url {config.state.redis_url}: {exc}") from exc
            self.stack.push_async_callback(self._close_redis, backend)
            try:
                loaded = await backend.open(reset=self.reset_state)
            except RedisStateError as exc:
                raise StartupError(str(exc)) from exc
        else:
            try:
                self.state_file.check_path()
                if not self.reset_state:
                    loaded = self.state_file.load()
            except StateFileError as exc:
                raise StartupError(str(exc)) from exc
        states, events = loaded if loaded is not None else ({}, [])
        self.events = EventLog(events)
        # Webhooks (notifications:): queued per receiver, never awaited by whoever appends.
        self.notifier = Notifier(config.notifications)
        self.notifier.start()
        self.stack.push_async_callback(self.notifier.close)  # what is queued is dropped, counted
        self.events.subscribe(self.notifier.offer)
        self.store = PolicyStore(config, merge_states(config, states))
        if backend is not None:
            lease_ms = round(config.state.lease * 1000)
            self.redis = RedisSync(backend, self.store, self.events, lease_ms)
            self.redis.start()
        else:
            try:
                self.persist()
            except OSError as exc:
                raise StartupError(
                    f"state.path {config.state.path}: cannot write the state file: "
                    f"{exc.strerror or exc}"
                ) from exc
        self.writer: StateWriter = self.redis or LocalWriter(self.store)
        self.stack.callback(self._final_save)

    async def _close_redis(self, backend: RedisStateStore) -> None:
        if self.redis is not None:
            await self.redis.close()  # writes what is left, then closes the connections
        else:
            await backend.close()

    def _final_save(self) -> None:
        if self.serving:
            with contextlib.suppress(OSError):  # logged by nobody: the store keeps the last
                self.persist()

    async def _open_gateway(self) -> None:
        self.listener = Listener(
            self.config, self.store, self.stats, self.mirrors, asyncio.get_running_loop()
        )
        self.gateway = self.listener.gateway
        self.stack.push_async_callback(self.gateway.close)
        try:
            self.listener.load_tls()
        except ConfigError as exc:
            raise StartupError(str(exc)) from exc
        try:
            self.server = await self.listener.listen()
        except OSError as exc:
            raise StartupError(f"listen: cannot bind {self.config.listen}: {exc}") from exc
        self.stack.callback(self.server.close)
        self.data_address = self.listener.address()
        self._spawn(self.listener.sweep())
        self._spawn(self.gateway.watch())
        self.gateway.upstreams.start_health_checks()

    def _open_supervisor(self) -> None:
        """workers > 1: this process supervises; the data plane runs in the workers."""
        if self.config.listen_tls is not None:
            try:  # each worker builds its own context from the same files: check them once
                server_context(self.config.listen_tls)
            except ConfigError as exc:
                raise StartupError(str(exc)) from exc
        self.supervisor = Supervisor(
            self.config, self.store, self.stats, self.events, self.persist, mirrors=self.mirrors
        )
        self.stack.push_async_callback(self.supervisor.close)
        try:
            self.supervisor.reserve()
        except SupervisorError as exc:
            raise StartupError(str(exc)) from exc
        self.data_address = self.supervisor.address

    async def _start_workers(self) -> None:
        assert self.supervisor is not None
        try:
            await self.supervisor.start()
        except SupervisorError as exc:
            raise StartupError(str(exc)) from exc

    async def _open_admin(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        supervisor = self.supervisor
        if supervisor is None:
            endpoints = lambda: self.gateway.upstreams.endpoint_states(loop.time())  # noqa: E731
            restarts = None
        else:
            endpoints, restarts = supervisor.reports.endpoint_states, lambda: supervisor.restarts
        registry = make_registry(
            self.stats,
            lambda: self.store.policy,
            endpoints,
            worker_restarts=restarts,
            get_replica=self.replica,
            mirrors=self.mirrors,
        )
        assert self.notifier is not None
        registry.register(NotificationCollector(self.notifier.rows))
        ctx = AdminContext(
            store=self.store,
            persist=self.persist,
            events=self.events,
            registry=registry,
            reload=self.reload,
            token=config.admin.token,
            ready=lambda: self.serving and not self.draining,  # workers up, not draining
            stats=self.stats,
            mirrors=self.mirrors,
            listen_host=config.admin.listen.host,
            allowed_hosts=config.admin.allowed_hosts,
            writer=self.writer,
        )
        self.admin_ctx = ctx
        admin = make_admin_app(ctx)
        if supervisor is not None:
            # Innermost: a change answers 200 only once every worker applied it.
            admin.middlewares.append(read_your_writes(self.store, supervisor.settle))
        self.admin_runner = web.AppRunner(admin, access_log=None)
        await self.admin_runner.setup()
        self.stack.push_async_callback(self.admin_runner.cleanup)
        site = web.TCPSite(self.admin_runner, config.admin.listen.host, config.admin.listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"admin.listen: cannot bind {config.admin.listen}: {exc}") from exc
        self.admin_address = ", ".join(
            f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
            for a in self.admin_runner.addresses
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A background task owned by the stack: cancelled and awaited when it unwinds."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        self.stack.push_async_callback(_cancel, task)

    def replica(self) -> ReplicaRow:
        if self.redis is None:
            return ("file", True, True)
        return ("redis", self.redis.available, self.redis.holds_lease())

    def persist(self) -> None:
        if self.redis is not None:
            self.redis.persist()  # an async save in the background
            return
        self.state_file.save(self.store.states(), self.events.since(0))

    async def reload(self) -> None:
        """Apply a new config file atomically; raises ConfigError and keeps the old one.
        Shared state: StateUnavailable (nothing applied) unless redis answers first."""
        config = load_config(self.config_path)
        if self.redis is not None:
            await self.redis.check()
        if (
            config.listen != self.config.listen
            or config.admin.listen != self.config.admin.listen
            or (config.listen_tls is None) != (self.config.listen_tls is None)
        ):
            logger.warning("reload: listen addresses changed; they apply at the next restart")
        if config.workers != self.config.workers:
            logger.warning("reload: workers changed; the new number applies at the next restart")
        if self.listener is not None:
            self.listener.reload_tls(config.listen_tls)  # ConfigError: the old one stays
        elif self.supervisor is not None and config.listen_tls is not None:
            server_context(config.listen_tls)  # the workers reload theirs: refuse a bad file here
        if self.notifier is not None:
            await self.notifier.reconfigure(config.notifications)
        self.admin_ctx.allowed_hosts = config.admin.allowed_hosts  # listen waits for a restart
        self.mirrors.reconfigure(config)  # before the policy that may shadow a new route
        if self.supervisor is not None:
            # The workers get the config with the states (one message each) and apply it
            # whole; the file was valid, so it is every worker or, above, none.
            self.stats.reconfigure(config)
            self.store.reconfigure(config)
            self.config = config
            await self.supervisor.settle(self.store.policy.generation)
        else:
            self.gateway.reconfigure(config)
            self.store.reconfigure(config)
            self.gateway.upstreams.start_health_checks()
            self.config = config
        if self.redis is not None:
            await self.redis.flush()  # answered only once redis holds the reloaded states

    async def shutdown(self) -> None:
        """The one shutdown sequence: readiness off, resign the lease, stop accepting,
        drain up to the grace period; then the stack closes the rest in reverse order
        (tasks, admin, pools, the final save, redis)."""
        grace = self.config.grace_period
        logger.info("shutting down: draining connections for up to %.0fs", grace)
        self.draining = True
        if self.redis is not None:
            await self.redis.resign()  # another replica runs the controller while we drain
        if self.supervisor is not None:
            await self.supervisor.stop(grace)  # each worker drains as below, then exits
        elif self.listener is not None:
            left = await self.listener.drain(grace)
            if left:
                logger.warning("grace period over: closing %d connections", left)
        await self.stack.aclose()
        logger.info("graygate stopped")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(config_path: str, reset_state: bool = False) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        logger.error("config %s: %s", config_path, exc)
        return 2
    raise_fd_limit()
    app = App(config_path, config, reset_state)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers first: a SIGTERM that lands while listeners open still means a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        return 2
    # Once started: a start-up failure stays one line.
    level = logging.WARNING if BUILD.stale else logging.INFO
    note = f"; {BUILD.note}" if BUILD.note else ""
    logger.log(level, "graygate %s (%s)%s", __version__, BUILD.describe(), note)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(_reload_logged(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await app.shutdown()
    return 0


def raise_fd_limit() -> None:
    """Each proxied request can hold two sockets: lift the soft descriptor limit to the hard
    one (as nginx's worker_rlimit_nofile does), so load is not capped at ~500 clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d: %s", soft, exc)


async def _reload_logged(app: App) -> None:
    try:
        await app.reload()
    except (ConfigError, StateUnavailable) as exc:
        logger.error("SIGHUP reload refused, keeping the running config: %s", exc)
        return
    app.events.append(None, "signal:SIGHUP", "reload", None, None, "SIGHUP")
    app.persist()
    logger.info("config reloaded on SIGHUP")
