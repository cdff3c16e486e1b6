"""Host names: the normal form of a Host value or a route's host pattern, whether a name
matches a compiled pattern, the strict form the admin guard compares, and the one form of
an address (address_form, admin.allowed_hosts too). The one home of these rules: policy
compiler, router, foreign-host check, config and control/guard.py. Pure: stdlib only.
"""

from __future__ import annotations

import contextlib
import ipaddress


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


def strict_host_name(value: str) -> str | None:
    """The name part of a Host value as the admin guard compares it; None when malformed.

    Stricter than host_name, which routes every request and never refuses one: a port must
    be digits, a name has no `:[]/@` or space, and addresses take one canonical form, IPv4
    compressed, IPv6 compressed in brackets, IPv4-mapped IPv6 as its IPv4 address:
    `[0:0::1]:9901` -> `[::1]`, `[::ffff:127.0.0.1]` -> `127.0.0.1`, `a:b` -> None.
    """
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        port = text[end + 1 :]
        if end < 0 or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        try:
            return address_form(ipaddress.IPv6Address(text[1:end]))
        except ValueError:
            return None
    name, sep, port = text.rpartition(":")
    if not sep:
        name = text
    elif not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(c in name for c in ":[]/@ "):
        return None
    with contextlib.suppress(ValueError):  # a name, not an address: compared as it is
        return address_form(ipaddress.IPv4Address(name))
    return name


def address_form(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The one form an address takes where Host names are compared (the admin guard and
    admin.allowed_hosts): IPv4 compressed, IPv6 compressed in brackets, IPv4-mapped IPv6
    as its IPv4 address: `::ffff:127.0.0.1` -> `127.0.0.1`, `0:0::1` -> `[::1]`."""
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = ip.ipv4_mapped
        return v4.compressed if v4 is not None else f"[{ip.compressed}]"
    return ip.compressed


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
