"""One data-plane worker of `workers: N` (`python -m proxy.dataplane.worker`, started by
the supervisor): the Gateway on a SO_REUSEPORT listener, policy from the channel applied
whole and acknowledged, figures batched back every flush interval. Never writes the state
store, never imports the control plane; dies with the supervisor (PDEATHSIG and EOF).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop

from proxy.core import figures
from proxy.core.config.model import ConfigError
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyError, PolicyStore
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
from proxy.dataplane.downstream import protocol_factory
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.tls import reload_context, server_context

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 5.0  # as app.SWEEP_INTERVAL: idle upstream connections past their timeout
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_FAILED = 2  # could not start (the supervisor got a Failed message saying why)
EXIT_ORPHAN = 3  # the supervisor was gone before we even started


class Worker:
    def __init__(self, channel_fd: int) -> None:
        self.channel_fd = channel_fd
        self.loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[Hello] = self.loop.create_future()
        self.stop = asyncio.Event()
        self.grace: float | None = None  # set by Drain; the config's grace_period otherwise
        self.pending: list[Policy] = []  # arrived before the store was built
        self.store: PolicyStore | None = None
        self.gateway: Gateway | None = None
        self.mirrors: Mirrors | None = None  # shadow counters, batched like the Stats
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.seq = 0
        self.sent_endpoints: list[EndpointRow] | None = None
        self.sent_anything = False
        self.supervisor_gone = False
        self.serving = False  # Serve arrived: accepting connections
        self.tls: ssl.SSLContext | None = None  # listen.tls: one context, reloaded in place

    async def run(self) -> int:
        sock = socket.socket(fileno=self.channel_fd)
        _, self.channel = await self.loop.connect_accepted_socket(
            lambda: Channel(self.on_message, self.on_lost), sock=sock
        )
        self.loop.add_signal_handler(signal.SIGTERM, self.begin_drain)
        try:
            hello = await self.hello
        except asyncio.CancelledError:
            return EXIT_ORPHAN  # channel lost before the supervisor said anything
        try:
            await self.open(hello)
        except OSError as exc:
            address = hello.config.listen
            self.channel.send(Failed(f"listen: cannot bind {address}: {exc}"))
            await self.close_channel()
            return EXIT_FAILED
        self.channel.send(Ready(os.getpid(), self.seq))
        await self.stop.wait()
        await self.shutdown()
        return 0

    async def open(self, hello: Hello) -> None:
        config = hello.config
        self.flush_interval = hello.flush_interval
        self.store = PolicyStore(config, hello.states)
        self.seq = hello.seq
        self.stats = Stats.from_config(config)
        self.mirrors = Mirrors.from_config(config)
        self.gateway = Gateway(config, self.store, self.stats, self.loop, mirrors=self.mirrors)
        for policy in self.pending:
            self.apply(policy)
        self.pending.clear()
        tls_options: dict[str, Any] = {}
        if config.listen_tls is not None:  # the supervisor checked the files already
            self.tls = server_context(config.listen_tls)
            tls_options = {"ssl": self.tls, "ssl_handshake_timeout": config.timeouts.client_header}
        # Bound now, accepting only on Serve: the supervisor sends Serve after every
        # Policy it sent so far, so no request is ever answered with an older one.
        self.server = await self.loop.create_server(
            protocol_factory(self.gateway),
            config.listen.host or None,
            hello.port,
            backlog=4096,
            reuse_address=True,
            reuse_port=True,
            start_serving=False,
            **tls_options,
        )
        self.spawn(self.gateway.watch())
        self.spawn(self.sweep())
        self.spawn(self.flush_loop())
        gc.collect()
        gc.freeze()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(self.loop.create_task(coro))

    # -- the channel ------------------------------------------------------------------------
    def on_message(self, message: Message) -> None:
        if isinstance(message, Policy):
            if self.store is None:
                self.pending.append(message)
            else:
                self.apply(message)
        elif isinstance(message, Hello):
            if not self.hello.done():
                self.hello.set_result(message)
        elif isinstance(message, Serve):
            if self.server is not None and self.gateway is not None and not self.stop.is_set():
                self.serving = True
                self.spawn(self.server.start_serving())
                self.gateway.upstreams.start_health_checks()  # a standby probes nothing
        elif isinstance(message, Drain):
            self.begin_drain(message.grace)

    def apply(self, policy: Policy) -> None:
        """The whole message in one synchronous step: no request runs between a reload's
        new pools and the states that go with them."""
        store, gateway = self.store, self.gateway
        assert store is not None and gateway is not None
        error = None
        try:
            if policy.config is not None:
                if self.tls is not None and policy.config.listen_tls is not None:
                    reload_context(self.tls, policy.config.listen_tls)  # new handshakes only
                gateway.reconfigure(policy.config)
                store.reconfigure(policy.config)
                if self.serving:
                    gateway.upstreams.start_health_checks()
            for name, state in policy.states.items():
                with contextlib.suppress(KeyError):
                    if store.state(name) == state:
                        continue
                store.adopt(name, state)
        except (PolicyError, KeyError, ValueError, ConfigError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.error("policy %d not applied: %s", policy.seq, error)
        else:
            self.seq = policy.seq
        self.channel.send(Ack(policy.seq, error))

    def on_lost(self) -> None:
        self.supervisor_gone = True
        if not self.hello.done():
            self.hello.cancel()
            return
        if not self.stop.is_set():
            logger.warning("supervisor gone: draining and exiting")
        self.begin_drain()

    def begin_drain(self, grace: float | None = None) -> None:
        if self.stop.is_set():
            return
        self.grace = grace
        self.stop.set()
        if not self.hello.done():
            self.hello.cancel()

    # -- figures ----------------------------------------------------------------------------
    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush()

    def flush(self, final: bool = False) -> None:
        assert self.gateway is not None
        deltas = figures.take(self.stats)
        shadows = figures.take_mirrors(self.mirrors) if self.mirrors is not None else []
        endpoints = self.gateway.upstreams.endpoint_states(self.loop.time())
        changed = endpoints != self.sent_endpoints
        if deltas or shadows or self.sent_anything or changed or final:
            # An empty batch after a busy one tells the supervisor nothing is in flight.
            self.channel.send(
                Figures(deltas, endpoints if changed else None, final, shadows or None)
            )
            self.sent_endpoints = endpoints
        self.sent_anything = bool(deltas)

    async def sweep(self) -> None:
        assert self.gateway is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.gateway.sweep_idle(time.monotonic())

    # -- the end ----------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting, drain up to the grace period, send the last figures, exit."""
        gateway, server = self.gateway, self.server
        assert gateway is not None and server is not None
        server.close()
        gateway.drain()
        grace = self.grace if self.grace is not None else gateway.config.grace_period
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gateway.drained.wait(), grace)
        left = len(gateway.connections)
        if left:
            logger.warning("grace period over: closing %d connections", left)
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not self.supervisor_gone:
            self.flush(final=True)
        await gateway.close()
        await self.close_channel()

    async def close_channel(self) -> None:
        self.channel.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.lost, 2.0)


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux); False if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.dataplane.worker")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    if not die_with_parent(ns.parent):
        return EXIT_ORPHAN
    # The terminal's Ctrl-C and hang-up reach the whole group: the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def run() -> int:
        return await Worker(ns.channel_fd).run()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
