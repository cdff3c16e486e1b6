"""`make perf-count`: callgrind instructions per request, compiled and pure builds.

micro: benchmarks.micro_proxy (no sockets), (I(N) - I(1)) / (2 (N - 1)), two passes of N.
server: the real `graygate serve` (nginx upstreams), N keep-alive requests on one connection
from a client outside valgrind, minus a run with 1 request, over N - 1. Wall-clock noise
does not enter: the figures compare builds and commits on any machine.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procs import (
    GraygateConfig,
    Processes,
    free_port,
    graygate_yaml,
    require_tool,
    start_upstream,
    wait_port,
)

BUILDS = {"compiled": {}, "pure": {"GRAYGATE_NO_EXTENSIONS": "1"}}
# The request of the benchmarks: a returning user (cohort cookie), a 5 B answer.
REQUEST = "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: gg_uid=bench-user-0001\r\n\r\n"
LENGTH_RE = re.compile(rb"(?im)^content-length: *(\d+)")
ROOT = Path(__file__).resolve().parent.parent


def callgrind(out: Path) -> list[str]:
    return [require_tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}"]


def instructions(out: Path) -> int:
    """The event total of a callgrind output file (Ir: instructions executed)."""
    match = re.search(r"^(?:totals|summary): (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{out}: no totals line; did the process exit cleanly?")
    return int(match.group(1))


def environ(build: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAYGATE_NO_EXTENSIONS"}
    return {**env, **BUILDS[build]}


def which_build(build: str) -> str:
    code = "from proxy.build import BUILD; print(BUILD.describe())"
    out = subprocess.run([sys.executable, "-c", code], env=environ(build), cwd=ROOT, text=True,
                         capture_output=True, check=True)  # fmt: skip
    return out.stdout.strip()


def micro(build: str, n: int, workdir: Path) -> float:
    counts = {}
    for requests in (n, 1):
        out = workdir / f"micro-{build}-{requests}.out"
        subprocess.run(
            [*callgrind(out), sys.executable, "-m", "benchmarks.micro_proxy", str(requests)],
            env=environ(build),
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        counts[requests] = instructions(out)
    return (counts[n] - counts[1]) / (2 * (n - 1))


def send(port: int, n: int, path: str) -> None:
    """n requests one after the other on one keep-alive connection; each answer read whole."""
    request = REQUEST.format(path=path, port=port).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        buf = b""
        for _ in range(n):
            sock.sendall(request)
            while b"\r\n\r\n" not in buf:
                buf += recv(sock)
            head, _, buf = buf.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            length = int(LENGTH_RE.findall(head)[0])
            while len(buf) < length:
                buf += recv(sock)
            buf = buf[length:]


def recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise RuntimeError("graygate closed the connection")
    return data


def server(
    build: str, n: int, path: str, workdir: Path, procs: Processes, blue: int, green: int
) -> float:
    cmd = [sys.executable, "-m", "proxy"]  # the interpreter itself runs under valgrind
    counts = {}
    for requests in (n, 1):
        name = f"graygate-{build}-{requests}"
        cfg = GraygateConfig(free_port(), free_port(), f"http://127.0.0.1:{blue}",
                             f"http://127.0.0.1:{green}")  # fmt: skip
        conf = workdir / f"{name}.yaml"
        conf.write_text(graygate_yaml(cfg, workdir / f"{name}-state.json"))
        out = workdir / f"{name}.out"
        proc = procs.start([*callgrind(out), *cmd, "serve", "-c", str(conf)], name, environ(build))
        wait_port(cfg.port, proc, timeout=300.0)
        send(cfg.port, requests, path)
        procs.stop(proc, grace=120.0)  # SIGTERM: graygate drains and exits, callgrind writes
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{procs.log_tail(name)}")
        counts[requests] = instructions(out)
    return (counts[n] - counts[1]) / (n - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--micro", type=int, default=2000, help="N of the micro benchmark")
    parser.add_argument("--requests", type=int, default=2000, help="N of the server run")
    parser.add_argument("--builds", nargs="+", choices=BUILDS, default=list(BUILDS))
    parser.add_argument("--path", default="/5b", choices=("/5b", "/64k"),
                        help="the answer the server run asks for: 5 B or 64 KiB")  # fmt: skip
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args(argv)
    if args.micro < 2 or args.requests < 2:
        parser.error("N must be at least 2: the run with 1 request is the baseline")
    version = subprocess.run([require_tool("valgrind"), "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    print(f"callgrind instructions per request ({version}, python {sys.version.split()[0]})")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="graygate-perf-") as tmp, Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        blue, green = free_port(), free_port()
        if not args.skip_server:
            start_upstream(procs, "blue", blue, None)
            start_upstream(procs, "green", green, None)
        for build in args.builds:
            running = which_build(build)
            if (build == "compiled") != (running == "compiled: mypyc"):
                print(f"{build}: not available here ({running}); skipped")
                continue
            t0 = time.monotonic()
            rows[build] = {f"micro_proxy, N={args.micro}": micro(build, args.micro, workdir)}
            if not args.skip_server:
                figure = server(build, args.requests, args.path, workdir, procs, blue, green)
                rows[build][f"graygate serve, {args.requests} x {args.path}"] = figure
            print(
                f"  {build} ({running}) measured in {time.monotonic() - t0:.0f} s", file=sys.stderr
            )
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"{'':38}" + "".join(f"{b:>12}" for b in rows))
    for name in names:
        print(f"{name:38}" + "".join(f"{r.get(name, 0):>12,.0f}" for r in rows.values()))
    if len(rows) == 2:
        for name in names:
            ratio = rows["compiled"][name] / rows["pure"][name]
            print(f"compiled / pure, {name}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
