"""`python -m benchmarks.balance`: how 64 keep-alive connections opened at once spread
over 2 worker processes, with SO_REUSEPORT (one listener per worker, the kernel hashes each
connection to one) and with one inherited listening socket (every worker accepts from it),
as uvloop servers like graygate's workers, and with the real `graygate serve` (workers: 2).
Prints, per mode, the smaller worker's share in each trial; the target is >= 1/3 of 64."""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONNECTIONS = 64


def serve(mode: str, arg: str) -> None:
    """A worker: answers every request with its pid (child process of this script)."""
    import uvloop

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            body = str(os.getpid()).encode()
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.transport.write(head + body)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if mode == "inherit":
            await loop.create_server(Answer, sock=socket.socket(fileno=int(arg)))
        else:
            await loop.create_server(Answer, "127.0.0.1", int(arg), reuse_port=True, backlog=4096)
        await asyncio.sleep(3600)

    uvloop.run(main())


async def trial(port: int) -> list[str]:
    """One round: 64 connections at once, one request each; the answering pid per path."""
    conns = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS))
    )
    answers = []
    for i, (_, writer) in enumerate(conns):
        writer.write(f"GET /balance/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for reader, writer in conns:
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        answers.append((await reader.readexactly(int(m.group(1)) if m else 0)).decode())
        writer.close()
    return answers


def standalone(mode: str, trials: int) -> list[int]:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mode == "reuseport":
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    fds: tuple[int, ...] = ()
    arg = str(port)
    if mode == "inherit":
        ls.listen(4096)
        fds, arg = (ls.fileno(),), str(ls.fileno())
    argv = [sys.executable, "-m", "benchmarks.balance", "--serve", mode, arg]
    workers = [subprocess.Popen(argv, pass_fds=fds) for _ in range(2)]
    try:
        time.sleep(1.5)
        return [smaller_share(asyncio.run(trial(port))) for _ in range(trials)]
    finally:
        for w in workers:
            w.kill()
            w.wait()
        ls.close()


def with_graygate(trials: int) -> list[int]:
    """The real command: which worker answered comes from its access log line."""
    with tempfile.TemporaryDirectory(prefix="graygate-balance-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            up_port = s.getsockname()[1]
        upstream = subprocess.Popen(  # one of our pid-answering servers
            [sys.executable, "-m", "benchmarks.balance", "--serve", "reuseport", str(up_port)]
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            admin = s.getsockname()[1]
        conf = Path(tmp) / "graygate.yaml"
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\nadmin: {{listen: "127.0.0.1:{admin}"}}\n'
            f'state: {{path: "{tmp}/state.json"}}\nworkers: 2\naccess_log: true\n'
            "routes:\n  - name: b\n    versions:\n"
            f'      blue: {{endpoints: ["http://127.0.0.1:{up_port}"]}}\n'
        )
        log = Path(tmp) / "graygate.log"
        with open(log, "wb") as fh:
            gg = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "-c", str(conf)],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while "standby worker ready" not in log.read_text():
                if gg.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text())
                time.sleep(0.1)
            shares = []
            for _ in range(trials):
                mark = len(log.read_text())
                asyncio.run(trial(port))
                time.sleep(0.2)  # the access lines follow the answers
                pids = re.findall(
                    r"graygate\.access\[(\d+)\]: .* /balance/", log.read_text()[mark:]
                )
                shares.append(smaller_share(pids))
            return shares
        finally:
            gg.terminate()
            gg.wait(20)
            upstream.kill()
            upstream.wait()


def smaller_share(answers: list[str]) -> int:
    counts = collections.Counter(answers)
    return min(counts.values()) if len(counts) == 2 else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.balance", description=__doc__)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--modes", default="reuseport,inherit,graygate")
    p.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    bound = CONNECTIONS / 3
    for mode in args.modes.split(","):
        shares = with_graygate(args.trials) if mode == "graygate" else standalone(mode, args.trials)
        below = sum(s < bound for s in shares)
        print(
            f"{mode:9}: smaller worker's connections of {CONNECTIONS} per trial: {shares}; "
            f"min {min(shares)}, mean {sum(shares) / len(shares):.1f}, "
            f"trials under 1/3: {below} of {len(shares)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
