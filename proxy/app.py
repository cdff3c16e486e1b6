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
import socket
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.build import BUILD
from proxy.control.admin import AdminContext, check_admin_exposure, make_admin_app
from proxy.control.controller import Controller
from proxy.control.metrics import make_registry
from proxy.control.store.events import EventLog
from proxy.control.store.file import FileStateStore, StateFileError, merge_states
from proxy.control.store.redis import RedisStateError, RedisStateStore, RedisSync
from proxy.core.config import Config, ConfigError, load_config
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.downstream import Gateway

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 5.0  # idle upstream connections past their idle timeout are closed


class StartupError(Exception):
    """graygate cannot start with this config or state; the message says how to fix it."""


class App:
    def __init__(self, config_path: str, config: Config, reset_state: bool = False) -> None:
        self.config_path = config_path
        self.config = config
        self.reset_state = reset_state
        self.draining = False
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None
        self.admin_runner: web.AppRunner | None = None
        self.data_address = ""
        self.admin_address = ""
        self.redis: RedisSync | None = None  # set when state.backend is redis

    async def start(self) -> None:
        config = self.config
        try:
            check_admin_exposure(config.admin.listen.host, config.admin.token)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        if config.workers != 1:
            raise StartupError(
                f"workers: only 1 is available in this release, got {config.workers} "
                "(run several graygate processes behind a load balancer; see README)"
            )
        self.state_file = FileStateStore(config.state.path)
        loaded = None
        backend: RedisStateStore | None = None
        if config.state.backend == "redis":  # shared by replicas; see proxy/store_redis.py
            backend = RedisStateStore(config.state.redis_url, config.state.redis_prefix)
            try:
                loaded = await backend.open(reset=self.reset_state)
            except RedisStateError as exc:
                raise StartupError(str(exc)) from exc
        elif not self.reset_state:
            try:
                loaded = self.state_file.load()
            except StateFileError as exc:
                raise StartupError(str(exc)) from exc
        states, events = loaded if loaded is not None else ({}, [])
        self.events = EventLog(events)
        self.store = PolicyStore(config, merge_states(config, states))
        if backend is not None:
            self.redis = RedisSync(backend, self.store, self.events)
            self.redis.start()
        self.stats = Stats.from_config(config)
        loop = asyncio.get_running_loop()
        self.gateway = Gateway(config, self.store, self.stats, loop)
        listen = config.listen
        try:
            self.server = await loop.create_server(
                self.gateway.protocol,
                listen.host or None,
                listen.port,
                backlog=4096,
                reuse_address=True,
            )
        except OSError as exc:
            raise StartupError(f"listen: cannot bind {listen}: {exc}") from exc
        self.data_address = _bound(self.server)
        registry = make_registry(
            self.stats,
            lambda: self.store.policy,
            lambda: self.gateway.upstreams.endpoint_states(loop.time()),
        )
        ctx = AdminContext(
            store=self.store,
            persist=self.persist,
            events=self.events,
            registry=registry,
            reload=self.reload,
            token=config.admin.token,
            ready=lambda: not self.draining,
            stats=self.stats,
        )
        self.admin_runner = web.AppRunner(make_admin_app(ctx), access_log=None)
        await self.admin_runner.setup()
        site = web.TCPSite(self.admin_runner, config.admin.listen.host, config.admin.listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"admin.listen: cannot bind {config.admin.listen}: {exc}") from exc
        self.admin_address = ", ".join(
            f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
            for a in self.admin_runner.addresses
        )
        self.controller = Controller(
            self.store,
            self.stats,
            self.events,
            self.persist,
            should_run=self.redis.holds_lease if self.redis is not None else None,
        )
        self._spawn(self.controller.run())
        self._spawn(self._sweep())
        self._spawn(self.gateway.watch())
        self.gateway.upstreams.start_health_checks()
        self.persist()
        # Start-up objects live forever: keep them out of every later GC pass.
        gc.collect()
        gc.freeze()
        logger.info(
            "graygate serving on http://%s, admin on http://%s, routes: %s",
            self.data_address,
            self.admin_address,
            ", ".join(r.name for r in config.routes),
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(coro))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.gateway.upstreams.sweep_idle(time.monotonic())

    def persist(self) -> None:
        if self.redis is not None:
            self.redis.persist()  # an async save in the background
            return
        self.state_file.save(self.store.states(), self.events.since(0))

    async def reload(self) -> None:
        """Apply a new config file atomically; raises ConfigError and keeps the old one."""
        config = load_config(self.config_path)
        if config.listen != self.config.listen or config.admin.listen != self.config.admin.listen:
            logger.warning("reload: listen addresses changed; they apply at the next restart")
        self.gateway.reconfigure(config)
        self.store.reconfigure(config)
        self.gateway.upstreams.start_health_checks()
        self.config = config

    async def shutdown(self) -> None:
        grace = self.config.grace_period
        logger.info("shutting down: draining connections for up to %.0fs", grace)
        self.draining = True
        if self.redis is not None:
            await self.redis.resign()  # another replica runs the controller while we drain
        if self.server is not None:
            self.server.close()
        self.gateway.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gateway.drained.wait(), grace)
        left = len(self.gateway.connections)
        if left:
            logger.warning("grace period over: closing %d connections", left)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.gateway.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        with contextlib.suppress(OSError):
            self.persist()
        if self.redis is not None:
            await self.redis.close()  # writes what is left, then closes the connections
        logger.info("graygate stopped")


def _bound(server: asyncio.Server) -> str:
    addrs = []
    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        addrs.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return ", ".join(addrs)


async def serve(config_path: str, reset_state: bool = False) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config file."""
    level = logging.WARNING if BUILD.stale else logging.INFO
    note = f"; {BUILD.note}" if BUILD.note else ""
    logger.log(level, "graygate %s (%s)%s", __version__, BUILD.describe(), note)
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
        await _close_partial(app)
        return 2
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
    except ConfigError as exc:
        logger.error("SIGHUP reload refused, keeping the running config: %s", exc)
        return
    app.events.append(None, "signal:SIGHUP", "reload", None, None, "SIGHUP")
    app.persist()
    logger.info("config reloaded on SIGHUP")


async def _close_partial(app: App) -> None:
    if app.server is not None:
        app.server.close()
    if app.admin_runner is not None:
        await app.admin_runner.cleanup()
    gateway = getattr(app, "gateway", None)
    if gateway is not None:
        await gateway.close()
    if app.redis is not None:
        await app.redis.close()
