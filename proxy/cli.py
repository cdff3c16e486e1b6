"""The `graygate` command: argv, logging, uvloop; runs app.serve() or a ctl command.
No routing knowledge lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from proxy import __version__
from proxy.build import BUILD
from proxy.control import ctl, ctl_mirror
from proxy.control.logs import LOG_FORMATS, configure
from proxy.core.config.describe import config_warnings, describe
from proxy.core.config.load import load_config
from proxy.core.config.model import ConfigError
from proxy.dataplane.tls import server_context

logger = logging.getLogger("proxy")

DEMO_CONFIG = "config/demo.yaml"
CONFIG_SCHEMA = Path(__file__).parent / "core" / "config" / "schema.json"


def _run(coro: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _serve(ns: argparse.Namespace) -> int:
    from proxy.app import serve

    return _run(serve(ns.config, ns.reset_state))


def _check(ns: argparse.Namespace) -> int:
    try:
        config = load_config(ns.config)
        if config.listen_tls is not None:
            server_context(config.listen_tls)  # the files exist, parse, and the key fits
    except ConfigError as exc:
        print(f"graygate: {ns.config}: {exc}", file=sys.stderr)
        return 2
    print(describe(config))
    for warning in config_warnings(config):
        print(f"graygate: warning: {warning}", file=sys.stderr)
    print(f"graygate: configuration file {ns.config} is valid")
    return 0


def _sample(ns: argparse.Namespace) -> int:
    from proxy.control.sample import serve_sample

    async def main() -> int:
        await serve_sample(ns.name, ns.host, ns.port)
        return 0

    try:
        return _run(main())
    except KeyboardInterrupt:
        return 0


def _demo(ns: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.control.sample import run_sample

    path = ns.config
    if not os.path.exists(path):
        print(f"graygate demo: {path} not found; run it from the repository root", file=sys.stderr)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"graygate: {path}: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        runners = []
        for route in config.routes[:1]:
            for version in route.versions:
                ep = version.endpoints[0]
                runners.append(await run_sample(version.name, ep.host, ep.port))
        listen = config.listen
        admin = config.admin.listen
        print(
            f"""
graygate demo: sample upstreams are up; the gateway starts now.

  curl -si http://{listen.host}:{listen.port}/                      # blue or green answers
  curl -si -H 'X-Canary: always' http://{listen.host}:{listen.port}/  # force the canary
  graygate status                                              # weights and rollout
  graygate weights demo blue=50 green=50                       # move the split live
  curl -s http://{admin.host}:{admin.port}/metrics | grep graygate_requests_total
  dashboard: http://{admin.host}:{admin.port}/

Ctrl-C stops everything.
""",
            flush=True,
        )
        try:
            return await serve(path, ns.reset_state)
        finally:
            for r in runners:
                await r.cleanup()

    return _run(main())


def _openapi(ns: argparse.Namespace) -> int:
    from proxy.control import openapi

    sys.stdout.write(openapi.text())
    return 0


def _schema(ns: argparse.Namespace) -> int:
    sys.stdout.write(CONFIG_SCHEMA.read_text(encoding="utf-8"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graygate", description="Traffic-splitting reverse proxy for gray releases."
    )
    parser.add_argument(
        "--version", action="version", version=f"graygate {__version__} ({BUILD.describe()})"
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("GRAYGATE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("GRAYGATE_LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text (default) or json: one object per line, the access log too",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument(
        "--reset-state", action="store_true", help="ignore the state file, start from the config"
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("check", help="validate a config file and print the resolved routes")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_check)

    p = sub.add_parser("demo", help="two sample upstreams plus the gateway, for a first look")
    p.add_argument("-c", "--config", default=DEMO_CONFIG)
    p.add_argument("--reset-state", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("sample-upstream", help="a tiny upstream that says which version it is")
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(func=_sample)

    p = sub.add_parser("openapi", help="print the admin API's OpenAPI 3.1 document (JSON)")
    p.set_defaults(func=_openapi)

    p = sub.add_parser("schema", help="print the config file's JSON Schema")
    p.set_defaults(func=_schema)

    ctl_mirror.add_parser(sub, ctl.add_arguments(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    configure(ns.log_level, ns.log_format)
    if ns.func in (_serve, _check, _demo, _sample, _openapi, _schema):
        return int(ns.func(ns))
    return int(_run(ns.func(ns)))
