"""The data plane served by the graygate process itself (`workers: 1`): the Gateway, its
listening server (HTTPS with one ssl.SSLContext, reloaded in place), the idle-connection
sweep and the drain. The app owns its lifetime and tasks; with `workers: N` each worker
serves its own data plane instead (worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Any

from proxy.core.config.model import Config, TlsConfig
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.downstream import protocol_factory
from proxy.dataplane.gateway import Gateway
from proxy.dataplane.tls import reload_context, server_context

SWEEP_INTERVAL = 5.0  # idle upstream connections past their idle timeout are closed


class Listener:
    def __init__(
        self,
        config: Config,
        store: PolicyStore,
        stats: Stats,
        mirrors: Mirrors,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.loop = loop
        self.gateway = Gateway(config, store, stats, loop, mirrors=mirrors)
        self.tls: ssl.SSLContext | None = None  # listen.tls; reloaded in place on SIGHUP
        self.server: asyncio.Server | None = None

    def load_tls(self) -> None:
        """The listener's context from listen.tls, if any; raises ConfigError."""
        if self.config.listen_tls is not None:
            self.tls = server_context(self.config.listen_tls)

    async def listen(self) -> asyncio.Server:
        """Bind and serve (raises OSError); load_tls() first."""
        config = self.config
        listen = config.listen
        tls_options: dict[str, Any] = {}
        if self.tls is not None:
            # A handshake is part of the request head's time: the same bound applies.
            tls_options = {"ssl": self.tls, "ssl_handshake_timeout": config.timeouts.client_header}
        self.server = await self.loop.create_server(
            protocol_factory(self.gateway),
            listen.host or None,
            listen.port,
            backlog=4096,
            reuse_address=True,
            **tls_options,
        )
        return self.server

    def address(self) -> str:
        addrs = []
        for sock in self.server.sockets if self.server is not None else ():
            host, port = sock.getsockname()[:2]
            addrs.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
        return ", ".join(addrs)

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.gateway.sweep_idle(time.monotonic())

    def reload_tls(self, tls: TlsConfig | None) -> None:
        """New handshakes get the new certificate; open connections keep theirs. A bad
        file raises ConfigError and the old certificate stays."""
        if self.tls is not None and tls is not None:
            reload_context(self.tls, tls)

    async def drain(self, grace: float) -> int:
        """Stop accepting, let open connections finish up to `grace` seconds; returns how
        many are still open then."""
        if self.server is not None:
            self.server.close()
        self.gateway.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gateway.drained.wait(), grace)
        return len(self.gateway.connections)
