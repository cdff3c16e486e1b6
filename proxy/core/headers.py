"""Header rewriting for both directions, on lists of (lowercase name, value) bytes, in
one pass each: hop-by-hop removal (RFC 9110 7.6.1) including fields named in
Connection, X-Forwarded-*/Via, and serialisation of the head. Pure: no I/O, no framing
decisions (exchange.py decides Content-Length vs chunked and passes the result in).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

Headers = list[tuple[bytes, bytes]]
Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

# Fields that describe one connection, never forwarded (RFC 9110 7.6.1, RFC 9112 6.1).
HOP_BY_HOP: Final = frozenset(
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
        b"http2-settings",  # RFC 7540 3.2.1: connection-specific, only part of an h2c upgrade
    }
)
HOP_BY_HOP_UPGRADE: Final = HOP_BY_HOP - {b"upgrade"}
# Never removed because Connection names them: dropping framing or Host would let one
# message run into the next (request smuggling). RFC 9110 7.6.1 forbids such options.
PROTECTED: Final = frozenset({b"content-length", b"host"})
# Written by graygate itself: the incoming X-Forwarded-For chain is extended (from an
# untrusted peer too, unless `replace`); Proto and Host are kept only from trusted proxies.
XFF: Final = b"x-forwarded-for"
XFP: Final = b"x-forwarded-proto"
XFH: Final = b"x-forwarded-host"
VIA: Final = b"via"
HOST: Final = b"host"
REQUEST_SPECIAL: Final = frozenset({XFF, XFP, XFH, VIA, HOST})


# Field names as the parsers report them -> lowercase, one shared object per name: no
# bytes.lower() call and no new object per field, and the shared object's hash is cached
# for the set lookups that follow. Names are the peer's choice, so the table is bounded.
_LOWER: Final[dict[bytes, bytes]] = {}
LOWER_NAMES: Final = 512
LOWER_NAME_CHARS: Final = 64


def lower_name(name: bytes) -> bytes:
    """name.lower(), from a bounded table of the names seen so far."""
    found = _LOWER.get(name)
    if found is not None:
        return found
    lowered = name.lower()
    if len(_LOWER) < LOWER_NAMES and len(name) <= LOWER_NAME_CHARS:
        found = _LOWER.get(lowered)
        if found is None:
            found = _LOWER[lowered] = lowered
        _LOWER[name] = found
        return found
    return lowered


# What a response field is to the client side, decided once per name (see ResponseField).
FORWARD: Final = 0  # relayed as it came
HOP: Final = 1  # hop-by-hop: never relayed
LENGTH: Final = 2  # Content-Length: relayed, and it frames the body
DATE: Final = 3  # relayed; graygate adds one when absent
CHUNKED: Final = 4  # Transfer-Encoding: hop-by-hop, and it frames the body
CONNECTION: Final = 5  # hop-by-hop, and it may name more fields to drop
MERGED_VIA: Final = 6  # merged into graygate's own Via


class ResponseField:
    """A response field name as the client side needs it: lowercase, its kind, and its
    line prefix (b"\\r\\nname: "), so relaying a field is two list appends. `raw`: the
    name as the parser reported it (the table's key); `relayed`: it goes to the client as
    it came (FORWARD, LENGTH, DATE)."""

    __slots__ = ("kind", "name", "raw", "relayed", "wire")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.name = name = lower_name(raw)
        self.wire = b"\r\n" + name + b": "
        if name == b"content-length":
            self.kind = LENGTH
        elif name == b"date":
            self.kind = DATE
        elif name == b"transfer-encoding":
            self.kind = CHUNKED
        elif name == b"connection":
            self.kind = CONNECTION
        elif name == VIA:
            self.kind = MERGED_VIA
        elif name in HOP_BY_HOP:
            self.kind = HOP
        else:
            self.kind = FORWARD
        self.relayed = self.kind in (FORWARD, LENGTH, DATE)


# The fields seen so far, by the length of their name as reported: a lookup is a few byte
# comparisons of equal length, where a dict costs the hash of a new bytes object first
# (about 470 instructions a field, compiled). Bounded: FIELDS_PER_LENGTH names a length.
FIELDS_PER_LENGTH: Final = 8
_BY_LENGTH: Final[list[list[ResponseField]]] = [[] for _ in range(LOWER_NAME_CHARS + 1)]


def response_field(name: bytes) -> ResponseField:
    """The ResponseField of a name as the parser reports it, from a bounded table."""
    size = len(name)
    if size > LOWER_NAME_CHARS:
        return ResponseField(name)
    seen = _BY_LENGTH[size]
    for field in seen:
        if field.raw == name:
            return field
    found = ResponseField(name)
    if len(seen) < FIELDS_PER_LENGTH:
        seen.append(found)
    return found


def keep_alive_means_11(headers: Headers) -> bool:
    """llhttp keeps a request's connection alive by default only for HTTP/1.1 (of the
    versions it accepts: 0.9, 1.0, 1.1, 2.0), and otherwise only for a Connection or
    Proxy-Connection field (it reads both as Connection). So a kept-alive request with
    neither field is HTTP/1.1; the caller checks Connection, this the other one."""
    for name, _ in headers:  # noqa: SIM110 - a loop compiles natively, all() makes a generator
        if name == b"proxy-connection":
            return False
    return True


def connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def upgrade_protocols(values: Iterable[bytes]) -> frozenset[bytes]:
    """The protocol names (lowercase, version dropped) in Upgrade field values.

    >>> sorted(upgrade_protocols([b"websocket, h2c", b"TLS/1.0"]))
    [b'h2c', b'tls', b'websocket']
    """
    return frozenset(
        t.split(b"/", 1)[0].strip().lower() for v in values for t in v.split(b",") if t.strip()
    )


_DROPPED_CACHE: Final[dict[tuple[bytes, bool], frozenset[bytes]]] = {}


def _dropped(connection: bytes | None, upgrade: bool) -> frozenset[bytes]:
    base = HOP_BY_HOP_UPGRADE if upgrade else HOP_BY_HOP
    if not connection:
        return base
    key = (connection, upgrade)
    drop = _DROPPED_CACHE.get(key)
    if drop is None:
        named = connection_tokens(connection) - PROTECTED
        if upgrade:
            named = named - {b"upgrade"}
        drop = base | named
        if len(_DROPPED_CACHE) < 64:  # the common values ("keep-alive", "close") stay
            _DROPPED_CACHE[key] = drop
    return drop


_NAMES_FIELDS: Final[dict[bytes, bool]] = {}


def names_fields(connection: bytes | None) -> bool:
    """Whether a response's Connection value names a field that would otherwise be
    relayed (any token but a hop-by-hop name; "close" too, as response_head reads it):
    then response_head filters the fields again. Bounded cache: common values repeat."""
    if not connection:
        return False
    found = _NAMES_FIELDS.get(connection)
    if found is None:
        found = bool(connection_tokens(connection) - HOP_BY_HOP - PROTECTED)
        if len(_NAMES_FIELDS) < 64:
            _NAMES_FIELDS[connection] = found
    return found


def is_trusted(addr: str, trusted: Networks) -> bool:
    if not trusted or not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 client seen through a dual-stack listener
    return any(ip in net for net in trusted)


def client_address(peer: str, chain: list[bytes], trusted: Networks) -> str:
    """The address a request is attributed to: the TCP peer, or, when the peer is a trusted
    proxy, the rightmost X-Forwarded-For entry that is not itself a trusted proxy (nginx
    `real_ip_recursive on`). A malformed entry ends the walk at the last trusted hop, so
    what comes back is always the peer or a well-formed address.

    >>> nets = (ipaddress.ip_network("10.0.0.0/8"),)
    >>> client_address("10.0.0.1", [b"6.6.6.6, 198.51.100.7", b"10.0.0.2"], nets)
    '198.51.100.7'
    """
    if not is_trusted(peer, trusted):
        return peer
    found = peer
    for line in reversed(chain):
        for entry in reversed(line.split(b",")):
            try:
                ip = ipaddress.ip_address(entry.strip().decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return found
            found = ip.compressed
            if not is_trusted(found, trusted):
                return found
    return found


def request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    connection: bytes | None,
    client_ip: bytes,
    trusted: bool,
    via: bytes,
    default_host: bytes,
    upgrade: bool = False,
    chunked: bool = False,
    replace_for: bool = False,
    scheme: bytes = b"http",
) -> bytes:
    """The head graygate sends upstream for a client request.

    Drops hop-by-hop fields and those named in `connection` (the client's Connection
    value); keeps Host as sent (or `default_host` when the client sent none).
    X-Forwarded-For is the incoming chain (every line, in order) plus `client_ip`, as
    nginx's $proxy_add_x_forwarded_for and Envoy do: only the last entry is graygate's
    word. `replace_for` drops an untrusted peer's chain. X-Forwarded-Host is graygate's
    own unless the peer is `trusted`; X-Forwarded-Proto is the listener's `scheme` unless
    a trusted proxy sent one. Via gets `via` appended.

    >>> head = request_head(b"GET", b"/", [(b"host", b"a"), (b"x-forwarded-for", b"6.6.6.6")],
    ...     None, b"10.0.0.1", False, b"1.1 graygate", b"up:80")
    >>> head.split(b"\\r\\n")[:3]
    [b'GET / HTTP/1.1', b'host: a', b'x-forwarded-for: 6.6.6.6, 10.0.0.1']
    """
    keep_chain = trusted or not replace_for
    drop = _dropped(connection, upgrade)
    # One append per piece, no tuple per field, and the lists of X-Forwarded-For and Via
    # lines joined as they come (most requests have neither): the head is the one object.
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    host: bytes | None = None
    chain: bytes | None = None
    vias: bytes | None = None
    proto: bytes | None = None
    fhost: bytes | None = None
    for name, value in headers:
        if name in drop:
            continue
        if name in REQUEST_SPECIAL:
            if name == HOST:
                if host is None:
                    host = value
                    parts.append(b"host: ")
                    parts.append(value)
                    parts.append(b"\r\n")
            elif name == VIA:
                vias = value if vias is None else vias + b", " + value
            elif name == XFF:
                if keep_chain and value.strip():  # an empty line adds no ", " entry
                    chain = value if chain is None else chain + b", " + value
            elif trusted:
                if name == XFP:
                    proto = proto or value
                elif fhost is None:
                    fhost = value
            continue
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if host is None:
        host = default_host
        parts.append(b"host: ")
        parts.append(host)
        parts.append(b"\r\n")
    parts.append(b"x-forwarded-for: ")
    if chain is not None:
        parts.append(chain)
        parts.append(b", ")
    parts.append(client_ip)
    parts.append(b"\r\nx-forwarded-proto: ")
    parts.append(proto or scheme)
    parts.append(b"\r\nx-forwarded-host: ")
    parts.append(fhost if fhost is not None else host)
    parts.append(b"\r\nvia: ")
    if vias is not None:
        parts.append(vias)
        parts.append(b", ")
    parts.append(via)
    if upgrade:
        parts.append(b"\r\nconnection: upgrade")
    if chunked:
        parts.append(b"\r\ntransfer-encoding: chunked")
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


_STATUS_LINES: Final[dict[int, bytes]] = {}


def status_prefix(status: int) -> bytes:
    """b"HTTP/1.1 200 ", made once per status code (100..599 reach here)."""
    found = _STATUS_LINES.get(status)
    if found is None:
        found = b"HTTP/1.1 %d " % status
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = found
    return found


def response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    connection: bytes | None,
    via: bytes,
    extra: tuple[tuple[bytes, bytes], ...],
    close: bool,
    keep_alive_10: bool = False,
    chunked: bool = False,
    upgrade: bool = False,
) -> bytes:
    """The head graygate sends to the client for an upstream response.

    Hop-by-hop fields and those named in the upstream's `connection` value go; Via gets
    `via` appended; `extra` (version header, Set-Cookie) is added as is. `close` adds
    `Connection: close`; `keep_alive_10` adds `Connection: keep-alive` for HTTP/1.0 clients.
    """
    drop = _dropped(connection, upgrade)
    fields: list[bytes] = []
    vias: bytes | None = None
    for name, value in headers:
        if name in drop:
            continue
        if name == VIA:
            vias = value if vias is None else vias + b", " + value
            continue
        fields.append(response_field(name).wire)
        fields.append(value)
    return response_wire(
        status, reason, fields, vias, via, extra, close, keep_alive_10, chunked, upgrade
    )


def response_wire(
    status: int,
    reason: bytes,
    fields: list[bytes],
    vias: bytes | None,
    via: bytes,
    extra: tuple[tuple[bytes, bytes], ...],
    close: bool,
    keep_alive_10: bool = False,
    chunked: bool = False,
    upgrade: bool = False,
) -> bytes:
    """The head from fields already sorted: `fields` holds the relayed ones as
    (ResponseField.wire, value) pieces, `vias` the upstream's Via values. The data plane
    sorts them as they arrive and calls this directly when the Connection value names no
    relayed field (names_fields); response_head sorts a list, then calls it."""
    parts = [status_prefix(status), reason]
    parts += fields
    parts.append(b"\r\nvia: ")
    if vias is not None:
        parts.append(vias)
        parts.append(b", ")
    parts.append(via)
    for name, value in extra:
        parts.append(b"\r\n")
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
    if upgrade:
        parts.append(b"\r\nconnection: upgrade")
    elif close:
        parts.append(b"\r\nconnection: close")
    elif keep_alive_10:
        parts.append(b"\r\nconnection: keep-alive")
    if chunked:
        parts.append(b"\r\ntransfer-encoding: chunked")
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


def serialize(first_line: bytes, headers: Headers) -> bytes:
    parts = [first_line]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
