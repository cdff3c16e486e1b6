"""The CLI's admin commands (status, weights, events, rollout, rollback): thin aiohttp clients
of the admin API that print readable tables, or the raw JSON with --json.
Exit codes: 0 done, 1 admin API unreachable or failing, 2 request refused (4xx) or bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from proxy.core.config.model import ConfigError
from proxy.core.config.rollout import parse_steps

DEFAULT_ADMIN = "http://127.0.0.1:9901"
TIMEOUT = 5.0
ROLLOUT_ACTIONS = ("start", "pause", "resume", "promote", "abort")


class _Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _call(
    admin_url: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> Any:
    url = admin_url.rstrip("/") + path
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, json=body, headers=hdrs, params=params) as resp,
        ):
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise _Failed(1, f"cannot reach admin API at {admin_url}: {detail}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise _Failed(1, f"admin API at {admin_url} answered {status} with non-JSON") from None
    if status >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        message = err.get("message") or f"HTTP {status}"
        if err.get("field"):
            message += f" (field: {err['field']})"
        code = err.get("code", "error")
        raise _Failed(2 if status < 500 else 1, f"{code}: {message}")
    return data


async def _run(
    work: Callable[[], Awaitable[Any]], show: Callable[[Any], None], json_out: bool
) -> int:
    try:
        data = await work()
    except _Failed as exc:
        print(f"graygate: {exc.message}", file=sys.stderr)
        return exc.code
    if json_out:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        show(data)
    return 0


# ---- formatting ----------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header)] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _weights(w: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in w.items())


def _rollout(r: dict[str, Any]) -> str:
    state = str(r.get("state", "idle"))
    if state in ("progressing", "paused"):
        text = f"{state} {r.get('canary')} step {int(r.get('step', -1)) + 1}"
        gate = r.get("paused_by_gate")
        if isinstance(gate, dict):
            answer = gate.get("status") or gate.get("error")
            text += f", held by gate {gate.get('gate')} ({answer})"
        return text
    if state in ("promoted", "rolled_back") and r.get("canary"):
        return f"{state} {r.get('canary')}"
    return state


def _show_state(data: dict[str, Any]) -> None:
    s = data["state"]
    print(
        f"{data['route']}: {_weights(s['weights'])}  stable={s['stable']}  "
        f"rollout={_rollout(s['rollout'])}  revision={s['revision']}"
    )


def _show_routes(data: dict[str, Any]) -> None:
    rows = [
        (
            r["name"],
            f"{r['match']['host']}{r['match']['path_prefix']}",
            r["stable"],
            _weights(r["weights"]),
            _rollout(r["rollout"]),
            r["revision"],
        )
        for r in data["routes"]
    ]
    print(_table(("ROUTE", "MATCH", "STABLE", "WEIGHTS", "ROLLOUT", "REV"), rows))


def _show_route(data: dict[str, Any]) -> None:
    s = data["state"]
    print(f"route {data['name']}  {data['match']['host']}{data['match']['path_prefix']}")
    print(f"stable {s['stable']}  rollout {_rollout(s['rollout'])}  revision {s['revision']}")
    stats = data.get("stats") or {}
    rows = []
    for version, info in data["versions"].items():
        st = stats.get(version) or {}
        rate = st.get("error_rate")
        rows.append(
            (
                version,
                f"{s['weights'].get(version, 0)}%",
                st.get("requests"),
                st.get("errors"),
                None if rate is None else f"{100 * rate:.2f}%",
                ", ".join(info["endpoints"]),
            )
        )
    print(_table(("VERSION", "WEIGHT", "REQUESTS", "ERRORS", "ERROR RATE", "ENDPOINTS"), rows))
    last = s["rollout"].get("last_verdict")
    if isinstance(last, dict) and last.get("message"):
        print(f"last decision: {last['message']}")


def _change(e: dict[str, Any]) -> str:
    before, after = e.get("before") or {}, e.get("after") or {}
    if e.get("route") is None:
        return ""
    parts = []
    wb, wa = before.get("weights", {}), after.get("weights", {})
    for v in wa:
        if wb.get(v) != wa[v]:
            parts.append(f"{v} {wb.get(v, '-')}->{wa[v]}")
    if before.get("stable") != after.get("stable"):
        parts.append(f"stable {before.get('stable')}->{after.get('stable')}")
    rb, ra = before.get("rollout", {}), after.get("rollout", {})
    if rb.get("state") != ra.get("state"):
        parts.append(f"rollout {rb.get('state')}->{ra.get('state')}")
    return ", ".join(parts)


def _show_events(data: dict[str, Any]) -> None:
    rows = [
        (
            e["id"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
            e.get("route"),
            e["actor"],
            e["action"],
            _change(e) or None,
            e.get("reason"),
        )
        for e in data["events"]
    ]
    if not rows:
        print("no events")
        return
    print(_table(("ID", "TIME", "ROUTE", "ACTOR", "ACTION", "CHANGE", "REASON"), rows))


def _reason_headers(reason: str | None, if_match: str | None = None) -> dict[str, str]:
    headers = {}
    if reason:
        headers["X-Graygate-Reason"] = reason
    if if_match:
        headers["If-Match"] = if_match
    return headers


def _path(route: str) -> str:
    return "/api/v1/routes/" + quote(route, safe="")


# ---- commands ------------------------------------------------------------------------------


async def status(
    admin_url: str, token: str | None, json_out: bool, route: str | None = None
) -> int:
    if route is None:
        return await _run(
            lambda: _call(admin_url, token, "GET", "/api/v1/routes"), _show_routes, json_out
        )
    return await _run(lambda: _call(admin_url, token, "GET", _path(route)), _show_route, json_out)


def parse_assignments(assignments: Sequence[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        try:
            weight = int(value)
        except ValueError:
            weight = -1
        if not sep or not name or weight < 0:
            raise ValueError(f"expected VERSION=PERCENT like blue=90, got {item!r}")
        result[name] = weight
    return result


async def weights(
    admin_url: str,
    token: str | None,
    route: str,
    assignments: list[str],
    reason: str | None,
    if_match: str | None,
    json_out: bool,
) -> int:
    try:
        body = parse_assignments(assignments)
    except ValueError as exc:
        print(f"graygate: {exc}", file=sys.stderr)
        return 2
    headers = _reason_headers(reason, if_match)
    return await _run(
        lambda: _call(admin_url, token, "PUT", _path(route) + "/weights", body, headers),
        _show_state,
        json_out,
    )


async def events(
    admin_url: str, token: str | None, route: str | None, since: int, json_out: bool
) -> int:
    params = {"since": str(since)}
    if route:
        params["route"] = route
    return await _run(
        lambda: _call(admin_url, token, "GET", "/api/v1/events", params=params),
        _show_events,
        json_out,
    )


async def rollout(
    admin_url: str,
    token: str | None,
    action: str,
    route: str,
    canary: str | None,
    steps: list[object] | None,
    json_out: bool,
    reason: str | None = None,
) -> int:
    if action not in ROLLOUT_ACTIONS:
        print(f"graygate: unknown rollout action {action!r}", file=sys.stderr)
        return 2
    headers = _reason_headers(reason)
    if action == "start":
        body: dict[str, Any] = {}
        if canary is not None:
            body["canary"] = canary
        if steps is not None:
            body["steps"] = steps
        path = _path(route) + "/rollout"
    else:
        body, path = {}, _path(route) + f"/rollout/{action}"
    return await _run(
        lambda: _call(admin_url, token, "POST", path, body, headers), _show_state, json_out
    )


async def rollback(
    admin_url: str, token: str | None, route: str, json_out: bool, reason: str | None = None
) -> int:
    return await _run(
        lambda: _call(
            admin_url, token, "POST", _path(route) + "/rollback", {}, _reason_headers(reason)
        ),
        _show_state,
        json_out,
    )


# ---- argparse ------------------------------------------------------------------------------


def _steps_arg(text: str) -> list[object]:
    """`5,10,50,100`, or a YAML list for pause and mirror entries:
    `[{mirror: 10m, percent: 20}, 5, 50, 100]`."""
    steps: list[object]
    if text.lstrip().startswith("["):
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise argparse.ArgumentTypeError(f"--steps is not a YAML list: {exc}") from None
        steps = loaded if isinstance(loaded, list) else [loaded]
    else:
        try:
            steps = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected weights like 5,10,50 or a YAML list, got {text!r}"
            ) from None
    try:
        parse_steps(steps, "--steps")  # the config file's rule and message
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return steps


async def _status_cmd(ns: argparse.Namespace) -> int:
    return await status(ns.admin, ns.token, ns.json, ns.route)


async def _weights_cmd(ns: argparse.Namespace) -> int:
    return await weights(
        ns.admin, ns.token, ns.route, ns.assignments, ns.reason, ns.if_match, ns.json
    )


async def _events_cmd(ns: argparse.Namespace) -> int:
    return await events(ns.admin, ns.token, ns.route, ns.since, ns.json)


async def _rollout_cmd(ns: argparse.Namespace) -> int:
    return await rollout(
        ns.admin, ns.token, ns.action, ns.route, ns.canary, ns.steps, ns.json, ns.reason
    )


async def _rollback_cmd(ns: argparse.Namespace) -> int:
    return await rollback(ns.admin, ns.token, ns.route, ns.json, ns.reason)


def add_arguments(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """The admin commands; returns their common options (--admin, --token, --json)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        default=os.environ.get("GRAYGATE_ADMIN_URL") or DEFAULT_ADMIN,
        help="admin API URL (env GRAYGATE_ADMIN_URL, default %(default)s)",
    )
    common.add_argument(
        "--token",
        default=os.environ.get("GRAYGATE_ADMIN_TOKEN") or None,
        help="admin bearer token (env GRAYGATE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print the API's raw JSON")

    p = subparsers.add_parser("status", parents=[common], help="routes, weights and rollouts")
    p.add_argument("route", nargs="?", help="show one route in detail")
    p.set_defaults(func=_status_cmd)

    p = subparsers.add_parser("weights", parents=[common], help="set a route's weights")
    p.add_argument("route")
    p.add_argument("assignments", nargs="+", metavar="VERSION=PERCENT")
    p.add_argument("--reason", help="recorded in the event log")
    p.add_argument("--if-match", metavar="REVISION", help="apply only at this revision")
    p.set_defaults(func=_weights_cmd)

    p = subparsers.add_parser("events", parents=[common], help="the audit log")
    p.add_argument("--route", help="only this route")
    p.add_argument("--since", type=int, default=0, metavar="ID", help="events after this id")
    p.set_defaults(func=_events_cmd)

    p = subparsers.add_parser("rollout", parents=[common], help="start or steer a rollout")
    p.add_argument("action", choices=ROLLOUT_ACTIONS)
    p.add_argument("route")
    p.add_argument("--canary", help="version to roll out (start; default the non-stable one)")
    p.add_argument(
        "--steps",
        type=_steps_arg,
        help="canary weights, e.g. 5,10,50,100, or a YAML list: '[{mirror: 10m}, 5, 100]' (start)",
    )
    p.add_argument("--reason", help="recorded in the event log")
    p.set_defaults(func=_rollout_cmd)

    p = subparsers.add_parser(
        "rollback", parents=[common], help="after a promotion: back to the previous stable"
    )
    p.add_argument("route")
    p.add_argument("--reason", help="recorded in the event log")
    p.set_defaults(func=_rollback_cmd)
    return common
