"""Header rewriting for both directions, on plain lists of (lowercase name, value) bytes.

Owns hop-by-hop removal (RFC 9110 7.6.1), X-Forwarded-*/Via, and serialising a head.
Pure: no I/O, no framing decisions (exchange.py decides Content-Length vs chunked).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

# Fields that describe one connection, never forwarded (RFC 9110 7.6.1, RFC 9112 6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Set by graygate itself: incoming copies from untrusted peers are dropped.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def strip_hop_by_hop(headers: Headers, keep_upgrade: bool = False) -> Headers:
    """Drop hop-by-hop fields and every field named in Connection.

    With keep_upgrade (a WebSocket handshake being proxied end to end) `Upgrade` and
    `Connection: upgrade` survive.
    """
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named |= connection_tokens(value)
    drop = HOP_BY_HOP | named
    if keep_upgrade:
        drop = drop - {b"upgrade"}
    out = [(n, v) for n, v in headers if n not in drop]
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out


def is_trusted(
    addr: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not trusted or not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def forwarding(
    headers: Headers,
    client_ip: str,
    host: bytes,
    trusted: bool,
    via: bytes,
    proto: bytes = b"http",
) -> Headers:
    """Add X-Forwarded-For/-Proto/-Host and Via to request headers (already hop-stripped).

    From a trusted proxy the incoming chain is kept and extended; from anyone else the
    incoming X-Forwarded-* are dropped, so a client cannot forge its address.
    """
    xff: list[bytes] = []
    out: Headers = []
    prior_via: list[bytes] = []
    fwd_proto: bytes | None = None
    fwd_host: bytes | None = None
    for name, value in headers:
        if name in FORWARDING:
            if trusted:
                if name == b"x-forwarded-for":
                    xff.append(value)
                elif name == b"x-forwarded-proto" and fwd_proto is None:
                    fwd_proto = value
                elif name == b"x-forwarded-host" and fwd_host is None:
                    fwd_host = value
            continue
        if name == b"via":
            prior_via.append(value)
            continue
        out.append((name, value))
    xff.append(client_ip.encode())
    out.append((b"x-forwarded-for", b", ".join(xff)))
    out.append((b"x-forwarded-proto", fwd_proto or proto))
    if fwd_host is not None or host:
        out.append((b"x-forwarded-host", fwd_host if fwd_host is not None else host))
    prior_via.append(via)
    out.append((b"via", b", ".join(prior_via)))
    return out


def response_via(headers: Headers, via: bytes) -> Headers:
    prior = [v for n, v in headers if n == b"via"]
    out = [(n, v) for n, v in headers if n != b"via"]
    prior.append(via)
    out.append((b"via", b", ".join(prior)))
    return out


def serialize(first_line: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    parts = [first_line]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
