"""`graygate mirror ROUTE`: the shadow traffic of a route from GET /api/v1/routes/{route}/mirror
as a summary and a table of its last mismatches (time, method, path, result, status a/b,
differing headers, differing JSON paths with both values), or the raw JSON with --json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from proxy.control.ctl import _call, _path, _run, _table

COUNTED = ("match", "status_mismatch", "header_mismatch", "body_mismatch", "shadow_error")


async def mirror(admin_url: str, token: str | None, route: str, json_out: bool) -> int:
    return await _run(
        lambda: _call(admin_url, token, "GET", _path(route) + "/mirror"), show_mirror, json_out
    )


def _json_paths(rows: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{d['path']}: {d['primary'] or '(absent)'} vs {d['shadow'] or '(absent)'}" for d in rows
    )


def show_mirror(data: dict[str, Any]) -> None:
    active = data.get("active")
    if active:
        by = "a rollout's mirror step" if active.get("step") else "the route's mirror:"
        print(f"{data['route']}: mirroring {active['percent']:g}% to {active['to']} ({by})")
    else:
        print(f"{data['route']}: no mirror in force")
    for version, counts in data.get("counts", {}).items():
        compared = sum(counts.get(r, 0) for r in COUNTED)
        dropped = data.get("dropped", {}).get(version, {})
        if not compared and not any(dropped.values()):
            continue
        parts = ", ".join(f"{counts.get(r, 0)} {r}" for r in COUNTED)
        causes = ", ".join(f"{c} {n}" for c, n in dropped.items() if n)
        print(
            f"  {version}: {compared} compared ({parts}); {sum(dropped.values())} dropped"
            + (f" ({causes})" if causes else "")
        )
    recent = data.get("recent", [])
    if not recent:
        print("no mismatches")
        return
    rows = [
        (
            time.strftime("%H:%M:%S", time.localtime(m["at"])),
            m["method"],
            m["path"],
            m["result"] + (f" ({m['detail']})" if m.get("detail") else ""),
            f"{m['status'][0]}/{m['status'][1]}",
            ", ".join(m["headers"]) or None,
            _json_paths(m["json_paths"]) or None,
        )
        for m in recent
    ]
    print(_table(("TIME", "METHOD", "PATH", "RESULT", "STATUS", "HEADERS", "JSON PATHS"), rows))


async def _mirror_cmd(ns: argparse.Namespace) -> int:
    return await mirror(ns.admin, ns.token, ns.route, ns.json)


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    p = subparsers.add_parser(
        "mirror", parents=[common], help="a route's shadow traffic and its last mismatches"
    )
    p.add_argument("route")
    p.set_defaults(func=_mirror_cmd)
