"""`python -m benchmarks.load URL`: a bounded load test with per-version shares and stickiness.

Reports req/s, latency percentiles, status codes, the share of each version (from the
version header) and, with --users K, how many simulated users saw more than one version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from benchmarks.loadgen import LoadResult, LoadSpec, TargetError, parse_target, run_load


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for suffix in ("ms", "s", "m"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    p.add_argument("url", help="http://127.0.0.1:PORT/path (loopback only)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="connections (default 16)")
    p.add_argument("-d", "--duration", type=parse_duration, default=10.0, help="e.g. 30s, 2m")
    p.add_argument("-r", "--rate", type=float, help="constant total req/s (default: max)")
    p.add_argument("-n", "--requests", type=int, help="stop after this many requests")
    p.add_argument("-H", "--header", action="append", type=parse_header, default=[])
    p.add_argument("--users", type=int, default=0, help="simulate K users (stickiness check)")
    p.add_argument("--user-key", choices=("header", "cookie", "both"), default="both")
    p.add_argument("--user-header", default="X-User-Id")
    p.add_argument("--version-header", default="X-Graygate-Version")
    p.add_argument("--no-keepalive", action="store_true", help="one connection per request")
    p.add_argument("--timeout", type=parse_duration, default=5.0, help="per request")
    p.add_argument("--bucket", type=parse_duration, default=0.1, help="timeline resolution")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--allow-remote", action="store_true", help="allow non-loopback targets")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    return p


def _progress(res: LoadResult, elapsed: float) -> None:
    codes = " ".join(f"{k}:{v}" for k, v in sorted(res.statuses.items()))
    share = " ".join(f"{v}={n * 100 / res.requests:.1f}%" for v, n in sorted(res.versions.items()))
    rps = res.requests / elapsed if elapsed else 0.0
    line = (
        f"\r{elapsed:5.1f}s/{res.spec.duration:.0f}s {res.requests:>9} req {rps:>9.0f} req/s "
        f"err {sum(res.errors.values())} [{codes}] {share}"
    )
    sys.stderr.write(line[:160].ljust(100))
    sys.stderr.flush()


def format_summary(s: dict[str, object]) -> str:
    lat = s["latency_ms"]
    assert isinstance(lat, dict)
    lines = [
        f"target      {s['url']}  concurrency {s['concurrency']}"
        + (f"  rate {s['rate_target']}/s" if s["rate_target"] else ""),
        f"requests    {s['requests']} in {s['duration']} s = {s['rps']} req/s",
        "latency ms  " + "  ".join(f"{k} {v}" for k, v in lat.items()),
        f"errors      {s['errors_total']} {s['errors'] or ''}  non-2xx {s['non2xx']}",
        f"statuses    {s['statuses']}",
        f"versions    {s['versions']}  share {s['version_share']}",
    ]
    if s.get("rate_target"):
        lines.append(f"late sends  {s['late_sends']} (sent > 1 ms after schedule)")
    users = s.get("users")
    if isinstance(users, dict):
        lines.append(
            f"users       {users['total']} simulated, {users['saw_multiple_versions']} saw more "
            f"than one version, {users['flips']} flips"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        parse_target(args.url, args.allow_remote)
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = LoadSpec(
        url=args.url,
        concurrency=args.concurrency,
        duration=args.duration,
        rate=args.rate,
        headers=tuple(args.header),
        users=args.users,
        user_key=args.user_key,
        user_header=args.user_header,
        keepalive=not args.no_keepalive,
        max_requests=args.requests,
        timeout=args.timeout,
        version_header=args.version_header,
        bucket=args.bucket,
        allow_remote=args.allow_remote,
    )
    live = sys.stderr.isatty() or not args.json
    try:
        if args.uvloop:
            import uvloop

            uvloop.install()
        result = asyncio.run(run_load(spec, _progress if live else None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if live:
        sys.stderr.write("\n")
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        summary.pop("timeline")
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
