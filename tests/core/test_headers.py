"""Unit tests of proxy/headers.py: hop-by-hop removal (RFC 9110 7.6.1), fields named in
Connection, forwarding headers and trust, Via, and the framing fields the caller asks for.
Pure functions on plain header lists: no loop, no sockets."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.headers import (
    FIELDS_PER_LENGTH,
    FORWARD,
    HOP_BY_HOP,
    LENGTH,
    LOWER_NAME_CHARS,
    LOWER_NAMES,
    MERGED_VIA,
    is_trusted,
    lower_name,
    names_fields,
    request_head,
    response_field,
    response_head,
    response_wire,
    upgrade_protocols,
)

# RFC 9110 7.6.1 / RFC 9112 and DESIGN.md section 3: never forwarded in either direction.
DESIGN_HOP_BY_HOP = (
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
)
VIA = b"1.1 graygate"


def parse(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a serialised head into its first line and (name, value) pairs, strictly."""
    assert head.endswith(b"\r\n\r\n"), head
    lines = head[:-4].split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, sep, value = line.partition(b": ")
        assert sep, f"malformed header line {line!r}"
        assert name == name.lower() and name.strip() == name and name, line
        fields.append((name, value))
    return lines[0], fields


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in fields if n == name]


def req(
    headers: list[tuple[bytes, bytes]],
    connection: bytes | None = None,
    *,
    trusted: bool = False,
    upgrade: bool = False,
    chunked: bool = False,
    client_ip: bytes = b"10.0.0.1",
    default_host: bytes = b"127.0.0.1:9001",
    method: bytes = b"GET",
    target: bytes = b"/",
    forwarded_for: str = "append",
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    extra = {} if forwarded_for == "append" else {"replace_for": True}
    return parse(
        request_head(
            method,
            target,
            headers,
            connection,
            client_ip,
            trusted,
            VIA,
            default_host,
            upgrade=upgrade,
            chunked=chunked,
            **extra,
        )
    )


def resp(
    headers: list[tuple[bytes, bytes]],
    connection: bytes | None = None,
    *,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    close: bool = False,
    keep_alive_10: bool = False,
    chunked: bool = False,
    upgrade: bool = False,
    status: int = 200,
    reason: bytes = b"OK",
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return parse(
        response_head(
            status,
            reason,
            headers,
            connection,
            VIA,
            extra,
            close,
            keep_alive_10=keep_alive_10,
            chunked=chunked,
            upgrade=upgrade,
        )
    )


# -- request_head: hop-by-hop -------------------------------------------------------------------


def test_request_line_and_plain_fields_kept_in_order() -> None:
    first, fields = req(
        [(b"host", b"shop"), (b"accept", b"*/*"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"3")],
        method=b"POST",
        target=b"/p?q=1",
    )
    assert first == b"POST /p?q=1 HTTP/1.1"
    plain = [(n, v) for n, v in fields if n in (b"accept", b"x-a", b"x-b")]
    assert plain == [(b"accept", b"*/*"), (b"x-a", b"1"), (b"x-a", b"2"), (b"x-b", b"3")]


@pytest.mark.parametrize("name", DESIGN_HOP_BY_HOP)
def test_request_drops_each_hop_by_hop_field(name: bytes) -> None:
    conn = b"keep-alive" if name == b"connection" else None
    _, fields = req([(b"host", b"shop"), (name, b"keep-alive"), (b"x-keep", b"1")], conn)
    assert values(fields, name) == []
    assert values(fields, b"x-keep") == [b"1"]


def test_request_drops_every_hop_by_hop_field_at_once() -> None:
    headers = [(b"host", b"shop")] + [(n, b"v") for n in DESIGN_HOP_BY_HOP] + [(b"x-keep", b"1")]
    _, fields = req(headers, b"v")
    names = {n for n, _ in fields}
    assert names.isdisjoint(DESIGN_HOP_BY_HOP)
    assert values(fields, b"x-keep") == [b"1"]


def test_request_drops_fields_named_in_connection_case_insensitively() -> None:
    _, fields = req(
        [(b"host", b"shop"), (b"x-secret", b"s"), (b"x-other", b"o"), (b"x-keep", b"k")],
        b"X-Secret, X-OTHER",
    )
    assert values(fields, b"x-secret") == []
    assert values(fields, b"x-other") == []
    assert values(fields, b"x-keep") == [b"k"]


def test_request_connection_tokens_tolerate_whitespace_and_empty_elements() -> None:
    # RFC 9110 5.6.1: empty list elements and optional whitespace are allowed.
    _, fields = req(
        [(b"host", b"shop"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")],
        b" ,x-a ,,\t x-b\t, ",
    )
    assert values(fields, b"x-a") == []
    assert values(fields, b"x-b") == []
    assert values(fields, b"x-c") == [b"3"]


def test_request_repeated_connection_lines_joined_by_comma_all_apply() -> None:
    # downstream.py joins repeated Connection lines with "," before calling request_head.
    headers = [
        (b"host", b"shop"),
        (b"connection", b"x-first"),
        (b"x-first", b"1"),
        (b"connection", b"X-Second, keep-alive"),
        (b"x-second", b"2"),
        (b"keep-alive", b"timeout=5"),
        (b"x-third", b"3"),
    ]
    _, fields = req(headers, b"x-first,X-Second, keep-alive")
    names = [n for n, _ in fields]
    for gone in (b"connection", b"x-first", b"x-second", b"keep-alive"):
        assert gone not in names
    assert values(fields, b"x-third") == [b"3"]


def test_request_repeated_values_of_a_named_field_all_dropped() -> None:
    _, fields = req([(b"host", b"shop"), (b"x-h", b"1"), (b"x-h", b"2")], b"x-h")
    assert values(fields, b"x-h") == []


def test_request_without_upgrade_drops_upgrade_and_adds_no_connection() -> None:
    _, fields = req(
        [(b"host", b"shop"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")], b"Upgrade"
    )
    assert values(fields, b"upgrade") == []
    assert values(fields, b"connection") == []


def test_request_upgrade_keeps_upgrade_and_adds_connection_upgrade_once() -> None:
    headers = [
        (b"host", b"shop"),
        (b"connection", b"keep-alive, Upgrade, x-gone"),
        (b"upgrade", b"websocket"),
        (b"x-gone", b"1"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"keep-alive", b"timeout=5"),
    ]
    _, fields = req(headers, b"keep-alive, Upgrade, x-gone", upgrade=True)
    assert values(fields, b"upgrade") == [b"websocket"]
    assert values(fields, b"connection") == [b"upgrade"]
    assert values(fields, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert values(fields, b"x-gone") == []
    assert values(fields, b"keep-alive") == []


def test_request_upgrade_still_drops_other_hop_by_hop() -> None:
    headers = [(b"host", b"shop"), (b"upgrade", b"websocket")]
    headers += [(n, b"v") for n in DESIGN_HOP_BY_HOP if n != b"upgrade"]
    _, fields = req(headers, b"upgrade", upgrade=True)
    for name in DESIGN_HOP_BY_HOP:
        if name not in (b"upgrade", b"connection"):
            assert values(fields, name) == [], name


@pytest.mark.parametrize("upgrade", [False, True])
def test_request_drops_http2_settings_even_when_connection_does_not_name_it(upgrade) -> None:
    # An h2c upgrade is never forwarded; its settings field is connection-specific either way.
    headers = [(b"host", b"shop"), (b"upgrade", b"websocket"), (b"http2-settings", b"AAMA")]
    _, fields = req(headers, b"Upgrade", upgrade=upgrade)
    assert values(fields, b"http2-settings") == []


@pytest.mark.parametrize(
    ("values_", "protocols"),
    [
        ([b"websocket"], {b"websocket"}),
        ([b"WebSocket"], {b"websocket"}),
        ([b"websocket, h2c"], {b"websocket", b"h2c"}),
        ([b"websocket", b"H2C"], {b"websocket", b"h2c"}),
        ([b" , TLS/1.0 ,, IRC/6.9"], {b"tls", b"irc"}),
        ([b"", b" , "], set()),
        ([], set()),
    ],
)
def test_upgrade_protocols_are_lowercase_names_without_versions(values_, protocols) -> None:
    assert upgrade_protocols(values_) == protocols


# -- request_head: Host, forwarding headers, Via, framing ---------------------------------------


def test_request_host_kept_as_sent() -> None:
    _, fields = req([(b"host", b"Shop.Example.com:8080")])
    assert values(fields, b"host") == [b"Shop.Example.com:8080"]


def test_request_host_first_only() -> None:
    _, fields = req([(b"host", b"a"), (b"x", b"1"), (b"host", b"b")])
    assert values(fields, b"host") == [b"a"]


def test_request_default_host_when_absent() -> None:
    _, fields = req([(b"accept", b"*/*")], default_host=b"10.1.2.3:9001")
    assert values(fields, b"host") == [b"10.1.2.3:9001"]
    assert values(fields, b"x-forwarded-host") == [b"10.1.2.3:9001"]


UNTRUSTED_FORWARDING = [
    (b"host", b"shop"),
    (b"x-forwarded-for", b"6.6.6.6"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-for", b"7.7.7.7, 8.8.8.8"),
    (b"x-forwarded-host", b"evil.example"),
]


def test_request_for_from_untrusted_is_appended_proto_and_host_replaced() -> None:
    # DESIGN.md section 3, as nginx's $proxy_add_x_forwarded_for and Envoy: the chain the
    # client sent (every line, in order) plus the address graygate saw. Only the last entry
    # is graygate's word; Proto and Host are graygate's own unless the peer is trusted.
    _, fields = req(UNTRUSTED_FORWARDING, client_ip=b"10.0.0.1", trusted=False)
    assert values(fields, b"x-forwarded-for") == [b"6.6.6.6, 7.7.7.7, 8.8.8.8, 10.0.0.1"]
    assert values(fields, b"x-forwarded-proto") == [b"http"]
    assert values(fields, b"x-forwarded-host") == [b"shop"]


def test_request_for_empty_incoming_line_adds_no_empty_entry() -> None:
    headers = [(b"host", b"shop"), (b"x-forwarded-for", b""), (b"x-forwarded-for", b"6.6.6.6")]
    _, fields = req(headers, client_ip=b"10.0.0.1")
    assert values(fields, b"x-forwarded-for") == [b"6.6.6.6, 10.0.0.1"]


def test_request_for_replace_drops_the_chain_of_an_untrusted_peer() -> None:
    _, fields = req(
        UNTRUSTED_FORWARDING, client_ip=b"10.0.0.1", trusted=False, forwarded_for="replace"
    )
    assert values(fields, b"x-forwarded-for") == [b"10.0.0.1"]
    assert values(fields, b"x-forwarded-proto") == [b"http"]
    assert values(fields, b"x-forwarded-host") == [b"shop"]


def test_request_for_replace_still_extends_a_trusted_proxys_chain() -> None:
    # `replace` is the behaviour before append: a trusted proxy's chain is what
    # trusted_proxies is for, so it is kept in both modes.
    headers = [(b"host", b"shop"), (b"x-forwarded-for", b"1.1.1.1")]
    _, fields = req(headers, client_ip=b"10.0.0.1", trusted=True, forwarded_for="replace")
    assert values(fields, b"x-forwarded-for") == [b"1.1.1.1, 10.0.0.1"]


def test_request_forwarding_headers_from_trusted_are_extended() -> None:
    headers = [
        (b"host", b"shop"),
        (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"),
        (b"x-forwarded-for", b"3.3.3.3"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"shop.example.com"),
    ]
    _, fields = req(headers, client_ip=b"10.0.0.1", trusted=True)
    assert values(fields, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1"]
    assert values(fields, b"x-forwarded-proto") == [b"https"]
    assert values(fields, b"x-forwarded-host") == [b"shop.example.com"]


def test_request_trusted_without_forwarding_headers_starts_the_chain() -> None:
    _, fields = req([(b"host", b"shop")], client_ip=b"::1", trusted=True)
    assert values(fields, b"x-forwarded-for") == [b"::1"]
    assert values(fields, b"x-forwarded-proto") == [b"http"]
    assert values(fields, b"x-forwarded-host") == [b"shop"]


def test_request_forwarding_headers_appear_once_each() -> None:
    _, fields = req(
        [(b"host", b"shop"), (b"x-forwarded-proto", b"a"), (b"x-forwarded-proto", b"b")]
    )
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"):
        assert len(values(fields, name)) == 1, name


def test_request_via_appended_to_existing() -> None:
    _, fields = req([(b"host", b"shop"), (b"via", b"1.0 fred"), (b"via", b"1.1 p.example")])
    assert values(fields, b"via") == [b"1.0 fred, 1.1 p.example, 1.1 graygate"]


def test_request_via_added_when_absent() -> None:
    _, fields = req([(b"host", b"shop")])
    assert values(fields, b"via") == [VIA]


def test_request_chunked_adds_transfer_encoding_once() -> None:
    headers = [(b"host", b"shop"), (b"transfer-encoding", b"gzip, chunked")]
    _, fields = req(headers, chunked=True, method=b"POST")
    assert values(fields, b"transfer-encoding") == [b"chunked"]


def test_request_not_chunked_adds_no_transfer_encoding_and_keeps_content_length() -> None:
    _, fields = req([(b"host", b"shop"), (b"content-length", b"5")], method=b"POST")
    assert values(fields, b"transfer-encoding") == []
    assert values(fields, b"content-length") == [b"5"]


def test_request_connection_cannot_strip_content_length() -> None:
    # `Connection: content-length` must not leave a forwarded body without framing: the
    # upstream would read the body as the next request (request smuggling). RFC 9110 7.6.1
    # forbids sending such an option; a proxy must keep the message self-delimiting.
    _, fields = req(
        [(b"host", b"shop"), (b"content-length", b"5"), (b"connection", b"content-length")],
        b"content-length",
        method=b"POST",
    )
    assert values(fields, b"content-length") == [b"5"]


# -- response_head --------------------------------------------------------------------------------


def test_response_status_line_and_plain_fields() -> None:
    first, fields = resp(
        [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
        status=404,
        reason=b"Not Found",
    )
    assert first == b"HTTP/1.1 404 Not Found"
    assert values(fields, b"set-cookie") == [b"a=1", b"b=2"]
    assert values(fields, b"content-type") == [b"text/plain"]


def test_response_drops_hop_by_hop_and_connection_named_fields() -> None:
    headers = [(n, b"v") for n in DESIGN_HOP_BY_HOP]
    headers += [(b"x-internal", b"1"), (b"x-keep", b"2"), (b"content-length", b"0")]
    _, fields = resp(headers, b"Keep-Alive, X-Internal")
    names = [n for n, _ in fields]
    assert set(names).isdisjoint(DESIGN_HOP_BY_HOP)
    assert b"x-internal" not in names
    assert values(fields, b"x-keep") == [b"2"]
    assert values(fields, b"content-length") == [b"0"]


def test_response_keep_alive_adds_no_connection_header() -> None:
    _, fields = resp([(b"connection", b"keep-alive"), (b"content-length", b"0")], b"keep-alive")
    assert values(fields, b"connection") == []


def test_response_close_adds_connection_close_once() -> None:
    _, fields = resp([(b"connection", b"close"), (b"content-length", b"0")], b"close", close=True)
    assert values(fields, b"connection") == [b"close"]


def test_response_keep_alive_10() -> None:
    _, fields = resp([(b"content-length", b"0")], keep_alive_10=True)
    assert values(fields, b"connection") == [b"keep-alive"]


def test_response_close_wins_over_keep_alive_10() -> None:
    _, fields = resp([(b"content-length", b"0")], close=True, keep_alive_10=True)
    assert values(fields, b"connection") == [b"close"]


def test_response_chunked_replaces_upstream_transfer_encoding() -> None:
    _, fields = resp([(b"transfer-encoding", b"chunked")], chunked=True)
    assert values(fields, b"transfer-encoding") == [b"chunked"]
    _, fields = resp([(b"transfer-encoding", b"chunked")], chunked=False)
    assert values(fields, b"transfer-encoding") == []


def test_response_extra_added_as_is_after_upstream_fields() -> None:
    extra = ((b"set-cookie", b"gg_uid=abc; Path=/"), (b"x-graygate-version", b"green"))
    _, fields = resp([(b"set-cookie", b"up=1"), (b"content-length", b"0")], extra=extra)
    assert values(fields, b"set-cookie") == [b"up=1", b"gg_uid=abc; Path=/"]
    assert values(fields, b"x-graygate-version") == [b"green"]


def test_response_via_appended() -> None:
    _, fields = resp([(b"via", b"1.1 origin-cache"), (b"content-length", b"0")])
    assert values(fields, b"via") == [b"1.1 origin-cache, 1.1 graygate"]


def test_response_upgrade_101_keeps_upgrade() -> None:
    headers = [
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-accept", b"x"),
    ]
    _, fields = resp(headers, b"Upgrade", upgrade=True, status=101, reason=b"Switching Protocols")
    assert values(fields, b"upgrade") == [b"websocket"]
    assert values(fields, b"connection") == [b"upgrade"]
    assert values(fields, b"sec-websocket-accept") == [b"x"]


def test_response_connection_cannot_strip_content_length() -> None:
    # Same as for requests: without Content-Length the client cannot find the end of the body.
    _, fields = resp(
        [(b"content-length", b"3"), (b"connection", b"content-length")], b"content-length"
    )
    assert values(fields, b"content-length") == [b"3"]


# -- is_trusted -----------------------------------------------------------------------------------

NETS = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("192.168.1.7/32"),
    ipaddress.ip_network("fd00::/8"),
    ipaddress.ip_network("::1/128"),
)


@pytest.mark.parametrize(
    "addr,expected",
    [
        ("10.0.0.1", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("192.168.1.7", True),
        ("192.168.1.8", False),
        ("fd12:3456::1", True),
        ("fe80::1", False),
        ("::1", True),
        ("127.0.0.1", False),
    ],
)
def test_is_trusted_ipv4_and_ipv6(addr: str, expected: bool) -> None:
    assert is_trusted(addr, NETS) is expected


@pytest.mark.parametrize(
    "addr", ["", "garbage", "10.0.0.1:80", "10.0.0", "10.0.0.256", "[::1]", " 10.0.0.1", "::1/128"]
)
def test_is_trusted_garbage_is_untrusted(addr: str) -> None:
    assert is_trusted(addr, NETS) is False


def test_is_trusted_no_networks_trusts_nobody() -> None:
    assert is_trusted("10.0.0.1", ()) is False
    assert is_trusted("::1", ()) is False


def test_is_trusted_ipv4_mapped_ipv6_peer() -> None:
    # A dual-stack listener ("::") reports IPv4 peers as ::ffff:a.b.c.d; a configured
    # IPv4 network must still match them (nginx's set_real_ip_from does).
    assert is_trusted("::ffff:10.0.0.1", NETS) is True
    assert is_trusted("::ffff:11.0.0.1", NETS) is False


# -- client_address: the address graygate attributes a request to --------------------------------


@pytest.mark.parametrize(
    "peer,chain,expected",
    [
        # An untrusted peer is the client, whatever it claims.
        ("203.0.113.9", [b"1.2.3.4"], "203.0.113.9"),
        ("127.0.0.1", [b"10.0.0.1"], "127.0.0.1"),
        # A trusted peer: the rightmost entry that is not itself a trusted proxy.
        ("10.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.7", b"10.0.0.2"], "198.51.100.7"),
        ("10.0.0.1", [b"6.6.6.6", b"198.51.100.7 , 10.0.0.2,fd00::9"], "198.51.100.7"),
        ("::ffff:10.0.0.1", [b"2001:db8::5"], "2001:db8::5"),
        # Nothing usable to the left: the last trusted hop seen.
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [b"10.0.0.3"], "10.0.0.3"),
        ("10.0.0.1", [b"6.6.6.6, unknown, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", [b"x\r\ninjected"], "10.0.0.1"),
        ("10.0.0.1", [b""], "10.0.0.1"),
    ],
)
def test_client_address_walks_the_chain_through_trusted_proxies(
    peer: str, chain: list[bytes], expected: str
) -> None:
    from proxy.core.headers import client_address

    assert client_address(peer, chain, NETS) == expected


# -- property: hop-by-hop never leaks, everything else passes through unchanged --------------------

PLAIN_NAMES = [b"accept", b"x-a", b"x-b", b"x-c", b"cookie", b"content-type", b"x-user-id"]
HOP_NAMES = sorted(set(DESIGN_HOP_BY_HOP) | HOP_BY_HOP)
TOKEN_NAMES = [b"x-a", b"x-b", b"x-c", b"x-d", b"x-e", b"keep-alive", b"close", b"te"]
SPECIAL = {b"host", b"via", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}

header_value = st.binary(min_size=0, max_size=12).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E)
)
token = st.sampled_from(TOKEN_NAMES).flatmap(
    lambda t: st.sampled_from([t, t.upper(), t.title(), b" " + t + b" "])
)
connection_values = st.lists(
    st.lists(token, min_size=0, max_size=3).map(lambda ts: b",".join(ts)), min_size=0, max_size=3
)
other_fields = st.lists(
    st.tuples(st.sampled_from(PLAIN_NAMES + HOP_NAMES + TOKEN_NAMES), header_value), max_size=15
)


def _inputs(
    conn_lines: list[bytes], others: list[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bytes | None, set[bytes]]:
    headers = [(b"connection", v) for v in conn_lines] + list(others)
    # Spread the Connection lines among the others, as a client may.
    headers.sort(key=lambda f: (len(f[1]) % 5) if f[0] == b"connection" else 2)
    connection = b",".join(conn_lines) if conn_lines else None
    named = {t.strip().lower() for v in conn_lines for t in v.split(b",") if t.strip()}
    return headers, connection, named


@settings(max_examples=300, deadline=None)
@given(conn_lines=connection_values, others=other_fields, trusted=st.booleans())
def test_property_request_no_hop_by_hop_leaks_others_unchanged(
    conn_lines: list[bytes], others: list[tuple[bytes, bytes]], trusted: bool
) -> None:
    headers, connection, named = _inputs(conn_lines, others)
    headers = [(b"host", b"shop"), *headers]
    _, fields = req(headers, connection, trusted=trusted)
    dropped = set(HOP_NAMES) | named
    out_names = [n for n, _ in fields]
    assert not dropped & set(out_names), (dropped & set(out_names), headers)
    expected = [(n, v) for n, v in headers if n not in dropped and n not in SPECIAL]
    assert [(n, v) for n, v in fields if n not in SPECIAL] == expected


@settings(max_examples=300, deadline=None)
@given(conn_lines=connection_values, others=other_fields, close=st.booleans())
def test_property_response_no_hop_by_hop_leaks_others_unchanged(
    conn_lines: list[bytes], others: list[tuple[bytes, bytes]], close: bool
) -> None:
    headers, connection, named = _inputs(conn_lines, others)
    _, fields = resp(headers, connection, close=close)
    dropped = set(HOP_NAMES) | named
    upstream_part = [(n, v) for n, v in fields if n != b"via"]
    if close:
        assert upstream_part[-1] == (b"connection", b"close")
        upstream_part = upstream_part[:-1]
    assert not dropped & {n for n, _ in upstream_part}
    expected = [(n, v) for n, v in headers if n not in dropped and n != b"via"]
    assert upstream_part == expected


def test_lower_name_is_lower_and_bounded():
    assert lower_name(b"Content-Length") == b"content-length"
    assert lower_name(b"CONTENT-length") is lower_name(b"content-length")  # one shared object
    long = b"X-" + b"A" * LOWER_NAME_CHARS
    assert lower_name(long) == long.lower()
    for i in range(LOWER_NAMES * 2):  # a peer inventing names: the table stops growing
        assert lower_name(b"X-Junk-%d" % i) == b"x-junk-%d" % i
    from proxy.core import headers

    assert len(headers._LOWER) <= LOWER_NAMES + 1


def test_keep_alive_means_11_unless_proxy_connection():
    from proxy.core.headers import keep_alive_means_11

    assert keep_alive_means_11([(b"host", b"a")])
    assert not keep_alive_means_11([(b"host", b"a"), (b"proxy-connection", b"keep-alive")])


# -- response_wire: the fast path of the data plane, response_head's bytes ---------------------

FIELD_NAMES = [
    *DESIGN_HOP_BY_HOP,
    b"Content-Length", b"DATE", b"Via", b"via", b"Server", b"x-Custom", b"Set-Cookie", b"close",
    b"proxy-authenticate", b"HTTP2-Settings", b"ETag",
]  # fmt: skip
CONNECTIONS = [None, b"keep-alive", b"close", b"Keep-Alive, Upgrade", b"x-custom", b"te, etag"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(FIELD_NAMES), st.sampled_from([b"1", b"a b", b""]))),
    st.sampled_from(CONNECTIONS),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_response_wire_is_response_head_when_connection_names_no_field(
    raw: list[tuple[bytes, bytes]], connection: bytes | None, close: bool, ka10: bool, chunked: bool
) -> None:
    """The data plane sorts each field by its ResponseField kind as it arrives (relayed:
    its wire prefix and value; Via: merged) and serialises with response_wire unless the
    Connection value names a field; the bytes must be response_head's for the same head."""
    headers: list[tuple[bytes, bytes]] = []
    wire: list[bytes] = []
    vias: bytes | None = None
    for name, value in raw:
        field = response_field(name)
        headers.append((field.name, value))
        if field.relayed:
            wire += (field.wire, value)
        elif field.kind == MERGED_VIA:
            vias = value if vias is None else vias + b", " + value
    extra = ((b"x-graygate-version", b"green"), (b"set-cookie", b"gg_uid=u1"))
    expected = response_head(
        200, b"OK", headers, connection, VIA, extra, close, keep_alive_10=ka10, chunked=chunked
    )
    if names_fields(connection):
        assert connection in (b"x-custom", b"te, etag", b"close")
        return  # the data plane takes response_head itself
    fast = response_wire(
        200, b"OK", wire, vias, VIA, extra, close, keep_alive_10=ka10, chunked=chunked
    )
    assert fast == expected


def test_response_field_kinds_and_the_bounded_table() -> None:
    assert response_field(b"Content-Length").name == b"content-length"
    assert response_field(b"Content-Length").kind == LENGTH
    assert response_field(b"Content-Length").relayed and response_field(b"Date").relayed
    assert not response_field(b"Transfer-Encoding").relayed and not response_field(b"Via").relayed
    assert response_field(b"X-Custom").wire == b"\r\nx-custom: "
    assert response_field(b"Server") is response_field(b"Server")  # one object per name
    assert [response_field(n).kind == FORWARD for n in DESIGN_HOP_BY_HOP] == [False] * 7
    # Names past the table's bound (FIELDS_PER_LENGTH a length) are answered, not kept.
    for i in range(FIELDS_PER_LENGTH + 5):
        assert response_field(b"X-Fill-%02d" % i).name == b"x-fill-%02d" % i
    assert response_field(b"X-Fill-12") is not response_field(b"X-Fill-12")
    assert response_field(b"Content-Length") is response_field(b"Content-Length")  # kept
    long = b"X-" + b"L" * LOWER_NAME_CHARS
    assert response_field(long).name == long.lower()
    assert response_field(long) is not response_field(long)


def test_names_fields_reads_connection_tokens() -> None:
    assert not names_fields(None)
    assert not names_fields(b"keep-alive")
    assert not names_fields(b"Keep-Alive, TE, upgrade")
    assert names_fields(b"close")  # response_head drops a field named "close": so does this
    assert names_fields(b"keep-alive, X-Secret")
    assert not names_fields(b"content-length")  # never dropped: PROTECTED
