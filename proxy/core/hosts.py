"""Host names: the normal form of a Host value or a route's host pattern, and whether a
name matches a compiled pattern. The one home of both rules, used by the policy compiler,
the router and the data plane's foreign-host check. Pure: standard library only.
"""

from __future__ import annotations


def host_name(host: str) -> str:
    """`Shop.Example.com:8080` -> `shop.example.com`; `[::1]:80` -> `::1`; a final dot goes.

    A value with more than one colon and no brackets is an IPv6 literal: kept whole.
    """
    if host.startswith("["):
        close = host.find("]")
        if close > 0:
            host = host[1:close]
    else:
        colon = host.find(":")
        if colon >= 0 and host.find(":", colon + 1) < 0:
            host = host[:colon]
    if host.endswith("."):
        host = host.rstrip(".")
    return host.lower()


def compile_pattern(pattern: str) -> tuple[str | None, str | None]:
    """A route's `match.host` -> (exact name, suffix): `*` -> (None, None), any host;
    `*.example.com` -> (None, ".example.com"), every subdomain but not the bare domain."""
    if pattern == "*":
        return None, None
    if pattern.startswith("*."):
        return None, "." + host_name(pattern[2:])
    return host_name(pattern), None


def matches(name: str, exact: str | None, suffix: str | None) -> bool:
    """`name` (already in normal form) against a compiled pattern."""
    if exact is not None:
        return name == exact
    if suffix is not None:
        return len(name) > len(suffix) and name.endswith(suffix)
    return True
