"""The operating-system side of `workers: N`: the reserved SO_REUSEPORT port, starting a
worker process with its socketpair, killing and reaping it, and how it ended in words.
The supervisor decides when; this module only knows how.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from proxy.core.config.model import Address
from proxy.core.figures import Pair
from proxy.dataplane.channel import Channel, EndpointRow, Message, Ready

REAP_TIMEOUT = 2.0  # after its channel closed, a worker gets this long to exit, then SIGKILL


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
        self.inflight: dict[Pair, int] = {}
        self.endpoints: list[EndpointRow] | None = None
        self.kill_reason: str | None = None
        self.lost_at = 0.0

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid})" if self.index >= 0 else f"standby {self.pid}"

    @property
    def is_ready(self) -> bool:
        return self.ready.done() and isinstance(self.ready.result(), Ready)

    def send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    async def reap(self, within: float = REAP_TIMEOUT) -> int | None:
        """Its exit status; SIGKILL when it has not exited `within` seconds."""
        deadline = time.monotonic() + within
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                deadline = time.monotonic() + within
            await asyncio.sleep(0.01)
        return code


def spawn(index: int) -> tuple[WorkerProcess, socket.socket]:
    """Start `python -m proxy.dataplane.worker` with one end of a new socketpair; the other
    end is returned for the channel."""
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
        # fork + exec takes a few ms in the loop thread, as asyncio's own subprocesses do.
        proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
    except OSError as exc:
        parent.close()
        raise SupervisorError(f"workers: cannot start {sys.executable}: {exc}") from exc
    finally:
        child.close()
    return WorkerProcess(index, proc), parent


def reserve(listen: Address) -> tuple[list[socket.socket], int, str]:
    """Bind (never listen) the port with SO_REUSEPORT: a port in use fails here, port 0
    becomes one concrete port for every worker, and no stranger takes it meanwhile.
    Returns the sockets (to keep open), the port and the address for the log."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            listen.host or None, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        port = listen.port
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr[0], port, *addr[2:]))
            port = port or int(sock.getsockname()[1])
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise SupervisorError(f"listen: cannot bind {listen}: {exc}") from exc
    names = []
    for sock in sockets:
        host = sock.getsockname()[0]
        names.append(f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}")
    return sockets, port, ", ".join(names)


def exit_text(code: int | None) -> str:
    if code is None:
        return "disappeared"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"
