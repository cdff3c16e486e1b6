"""RFC 9110 / RFC 9112 conformance of the data plane as a reverse proxy: what an external
HTTP conformance or robustness suite probes and the other data-plane tests do not.
Real in-process gateway, raw-socket clients, raw asyncio upstreams writing HTTP by hand
(so every byte the proxy sends and receives is visible)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from tests.helpers import (
    RawServer,
    raw_exchange,
    read_framed_body,
    route_config,
    split_head,
    status_of,
)

FAST = {"connect": "500ms", "read": "1s", "request": "3s"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- raw client -------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    status_line: bytes
    headers: list[tuple[bytes, bytes]]  # (lowercase name, raw value)
    body: bytes

    def all(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n == key]

    def get(self, name: str) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None


class Client:
    """One downstream connection reading responses with exact HTTP/1.1 framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: str = "GET", timeout: float = 3.0) -> Resp:
        async with asyncio.timeout(timeout):
            line, headers = split_head(await self.reader.readuntil(b"\r\n\r\n"))
            resp = Resp(int(line.split(b" ", 2)[1]), line, headers, b"")
            resp.body = await read_framed_body(
                self.reader,
                method,
                resp.status,
                resp.get("transfer-encoding"),
                resp.get("content-length"),
            )
        return resp

    async def request(self, data: bytes, method: str = "GET") -> Resp:
        await self.send(data)
        return await self.response(method)

    async def rest(self, timeout: float = 2.0) -> bytes:
        """Everything until the server closes (or `timeout`)."""
        out = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    out.append(chunk)
        return b"".join(out)

    async def closed(self, timeout: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True


@pytest.fixture
async def client() -> AsyncIterator[Callable[[int], Awaitable[Client]]]:
    opened: list[Client] = []

    async def open_(port: int) -> Client:
        c = Client(*await asyncio.open_connection("127.0.0.1", port))
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.writer.close()
        with contextlib.suppress(ConnectionError):
            await c.writer.wait_closed()


async def once(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until close or timeout."""
    return (await raw_exchange(port, data, timeout))[0]


def req(
    method: str, target: str, *fields: str, version: str = "HTTP/1.1", body: bytes = b""
) -> bytes:
    lines = "".join(f"{f}\r\n" for f in fields)
    return f"{method} {target} {version}\r\n{lines}\r\n".encode("latin-1") + body


# -- raw upstream -----------------------------------------------------------------------------


@dataclass
class Seen:
    conn: int  # 1-based index of the upstream connection it came on
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]

    def all(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n == key]


Answer = Callable[[Seen], bytes]


@dataclass
class Upstream:
    answer: Answer
    close_after: bool = False  # close the connection after each answer
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    raw: RawServer = field(init=False)

    def __post_init__(self) -> None:
        self.raw = RawServer(self.serve)

    @property
    def port(self) -> int:
        return self.raw.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def per_connection(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.seen:
            counts[s.conn] = counts.get(s.conn, 0) + 1
        return counts

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = self.connections
        try:
            while True:
                seen = await read_one(reader, index)
                if seen is None:
                    return
                self.seen.append(seen)
                writer.write(self.answer(seen))
                await writer.drain()
                if self.close_after:
                    return
        except ValueError:
            return  # framing read_one cannot parse: the connection ends (RawServer closes it)


async def read_one(reader: asyncio.StreamReader, index: int) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, headers = split_head(head)
    seen = Seen(index, line, headers, b"", [])
    te = [v for n, v in headers if n == b"transfer-encoding"]
    cl = [v for n, v in headers if n == b"content-length"]
    if te:
        body = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    name, _, value = line[:-2].partition(b":")
                    seen.trailers.append((name.lower(), value.strip()))
                break
            body.append(await reader.readexactly(size))
            await reader.readexactly(2)
        seen.body = b"".join(body)
    elif cl:
        seen.body = await reader.readexactly(int(cl[0]))
    return seen


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(answer: Answer | bytes = OK, close_after: bool = False) -> Upstream:
        fn = answer if callable(answer) else (lambda _s, a=answer: a)
        up = Upstream(fn, close_after)
        await up.raw.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.raw.stop()


@pytest.fixture
async def proxied(upstream, gateway):
    """(upstream, gateway) with one catch-all route to a raw upstream answering `answer`."""

    async def start(answer: Answer | bytes = OK, close_after: bool = False, **top):
        up = await upstream(answer, close_after)
        gw = await gateway([route_config(up.url)], timeouts=FAST, **top)
        return up, gw

    return start


# -- Max-Forwards (RFC 9110 7.6.2) ------------------------------------------------------------


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE"])
async def test_max_forwards_zero_is_answered_by_the_proxy(proxied, client, method):
    # "If the received value is zero (0), the recipient MUST NOT forward the request;
    # instead, the recipient MUST respond as the final recipient."
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req(method, "/mf", "Host: t", "Max-Forwards: 0"))
    assert up.seen == [], f"{method} with Max-Forwards: 0 was forwarded"
    # OPTIONS: a 2xx describing the proxy; TRACE: an echo, or a refusal of TRACE itself.
    allowed = {200, 204} if method == "OPTIONS" else {200, 405, 501}
    assert resp.status in allowed, resp.status_line


@pytest.mark.parametrize(("method", "sent", "forwarded"), [("OPTIONS", 5, 4), ("TRACE", 1, 0)])
async def test_max_forwards_is_decremented_when_forwarded(proxied, client, method, sent, forwarded):
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req(method, "/mf", "Host: t", f"Max-Forwards: {sent}"))
    assert resp.status == 200
    assert len(up.seen) == 1
    assert up.seen[0].all("max-forwards") == [str(forwarded).encode()]


# -- Via received-protocol (RFC 9110 7.6.3) ---------------------------------------------------


async def test_via_on_request_names_the_client_protocol_version(proxied, client):
    # received-protocol is the version of the message graygate received: 1.0 from this client.
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req("GET", "/v", "Host: t", version="HTTP/1.0"))
    assert resp.status == 200
    assert up.seen[0].all("via") == [b"1.0 graygate"]


async def test_via_names_http_10_kept_alive_by_proxy_connection(proxied, client):
    # llhttp reads Proxy-Connection as Connection: this 1.0 request is kept alive without a
    # Connection field, and is still HTTP/1.0 (downstream infers 1.1 only without either).
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(
        req("GET", "/v", "Host: t", "Proxy-Connection: keep-alive", version="HTTP/1.0")
    )
    assert resp.status == 200
    assert up.seen[0].all("via") == [b"1.0 graygate"]


async def test_via_on_response_names_the_upstream_protocol_version(proxied, client):
    _up, gw = await proxied(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", close_after=True)
    c = await client(gw.port)
    resp = await c.request(req("GET", "/v", "Host: t"))
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.all("via") == [b"1.0 graygate"]


# -- interim responses ------------------------------------------------------------------------

EARLY_HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLink: </style.css>; rel=preload\r\n\r\nfinal"
)


async def test_103_early_hints_reach_an_http11_client(proxied, client):
    _up, gw = await proxied(EARLY_HINTS)
    c = await client(gw.port)
    await c.send(req("GET", "/hints", "Host: t"))
    hints = await c.response()
    assert hints.status == 103
    assert hints.all("link") == [b"</style.css>; rel=preload"]
    assert hints.get("content-length") is None and hints.get("transfer-encoding") is None
    final = await c.response()
    assert final.status == 200 and final.body == b"final"
    await c.send(req("GET", "/next", "Host: t"))
    assert (await c.response()).status == 103
    assert (await c.response()).status == 200


async def test_no_interim_response_to_an_http10_client(proxied, client):
    # RFC 9110 15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client.
    _up, gw = await proxied(EARLY_HINTS)
    raw = await once(gw.port, req("GET", "/hints", "Host: t", version="HTTP/1.0"))
    assert status_of(raw) == 200, raw[:200]
    assert b" 103 " not in raw
    assert raw.endswith(b"\r\n\r\nfinal")


async def test_http10_keep_alive_client_with_unframed_upstream_answer_gets_close(proxied, client):
    # No chunked coding for HTTP/1.0 (RFC 9112 7.1): the close delimits the body, so the
    # connection cannot stay alive even though the client asked for it.
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    _up, gw = await proxied(chunked)
    c = await client(gw.port)
    await c.send(req("GET", "/s", "Host: t", "Connection: keep-alive", version="HTTP/1.0"))
    raw = await c.rest(3.0)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status_of(raw) == 200
    assert b"transfer-encoding" not in head.lower()
    assert b"keep-alive" not in head.lower()
    assert body == b"abcde"
    assert await c.closed(1.0)


# -- upstream connection reuse (RFC 9112 9.3) -------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["http10_no_keep_alive", "http11_connection_close"],
)
async def test_upstream_connection_not_reused_when_it_is_not_persistent(proxied, client, answer):
    # The upstream leaves the socket open: only the proxy's reading of the response
    # (HTTP/1.0 without keep-alive, or Connection: close) can stop a reuse.
    up, gw = await proxied(answer)
    c = await client(gw.port)
    for i in range(3):
        resp = await c.request(req("GET", f"/r{i}", "Host: t"))
        assert (resp.status, resp.body) == (200, b"ok")
    assert up.per_connection() == {1: 1, 2: 1, 3: 1}


# -- bodiless responses and their framing fields ----------------------------------------------


async def test_head_and_304_content_length_passed_unchanged(proxied, client):
    def answer(s: Seen) -> bytes:
        if s.line.startswith(b"HEAD"):
            return b'HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: "e1"\r\n\r\n'
        if b"/304" in s.line:
            return b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "e1"\r\n\r\n'
        return OK

    _up, gw = await proxied(answer)
    c = await client(gw.port)
    head = await c.request(req("HEAD", "/h", "Host: t"), method="HEAD")
    assert head.status == 200
    assert head.all("content-length") == [b"1234"] and head.all("etag") == [b'"e1"']
    r304 = await c.request(req("GET", "/304", "Host: t", 'If-None-Match: "e1"'))
    assert r304.status == 304
    assert r304.all("content-length") == [b"1234"] and r304.all("etag") == [b'"e1"']
    after = await c.request(req("GET", "/after", "Host: t"))
    assert (after.status, after.body) == (200, b"ok")


async def test_204_from_upstream_loses_its_content_length(proxied, client):
    # RFC 9110 8.6: "A server MUST NOT send a Content-Length header field in any response
    # with a status code of 1xx (Informational) or 204 (No Content)." The upstream did;
    # graygate, sending the message on, must not repeat it.
    def answer(s: Seen) -> bytes:
        if b"/204" in s.line:
            return b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
        return OK

    _up, gw = await proxied(answer)
    c = await client(gw.port)
    r204 = await c.request(req("GET", "/204", "Host: t"))
    assert r204.status == 204
    assert r204.get("content-length") is None, r204.headers
    after = await c.request(req("GET", "/after", "Host: t"))
    assert (after.status, after.body) == (200, b"ok")


# -- response framing from the upstream (RFC 9112 6.3, RFC 9110 8.6) --------------------------


async def test_upstream_with_content_length_and_transfer_encoding_is_not_relayed_with_both(
    proxied, client
):
    # RFC 9112 6.3 (3): TE overrides CL; an intermediary that forwards such a message MUST
    # first remove Content-Length. A 502 is the other safe answer, and graygate's.
    bad = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    _up, gw = await proxied(bad, close_after=True)
    c = await client(gw.port)
    resp = await c.request(req("GET", "/cl-te", "Host: t"))
    assert resp.status == 502, resp.status_line
    if resp.status == 200:
        assert resp.get("content-length") is None, resp.headers
        assert resp.body == b"hello"


async def test_upstream_with_two_equal_content_lengths(proxied, client):
    # RFC 9110 8.6: either rejected (502) or relayed with one valid Content-Length; graygate
    # rejects it (and the upstream answers every request so, /after too).
    _up, gw = await proxied(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    c = await client(gw.port)
    resp = await c.request(req("GET", "/dup", "Host: t"))
    assert resp.status == 502
    if resp.status == 200:
        assert resp.all("content-length") == [b"2"] and resp.body == b"ok"
    after = await c.request(req("GET", "/after", "Host: t"))
    assert after.status == 502


async def test_obs_text_in_field_values_passes_byte_for_byte(proxied, client):
    # RFC 9110 5.5: field-vchar includes obs-text (%x80-FF); a proxy relays it unchanged.
    up, gw = await proxied(
        b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9 \xff\r\nContent-Length: 2\r\n\r\nok"
    )
    c = await client(gw.port)
    resp = await c.request(b"GET / HTTP/1.1\r\nHost: t\r\nX-Who: Andr\xe9\r\n\r\n")
    assert resp.status == 200
    assert resp.all("x-name") == [b"caf\xe9 \xff"]
    assert up.seen[0].all("x-who") == [b"Andr\xe9"]


async def test_empty_reason_phrase_is_a_valid_status_line(proxied, client):
    _up, gw = await proxied(b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok")
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: t"))
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.status_line.startswith(b"HTTP/1.1 200 ")


async def test_status_line_without_reason_space_is_relayed_well_formed_or_refused(proxied, client):
    # "HTTP/1.1 204\r\n" lacks the SP RFC 9112 4 requires; lenient parsers accept it. Either
    # way, what graygate itself sends must be a valid status-line and keep the stream in sync.
    # graygate's parser accepts it: a 204 (a 502 would be the refusal).
    def answer(s: Seen) -> bytes:
        return b"HTTP/1.1 204\r\n\r\n" if b"/204" in s.line else OK

    _up, gw = await proxied(answer)
    c = await client(gw.port)
    resp = await c.request(req("GET", "/204", "Host: t"))
    assert resp.status == 204
    assert resp.status_line.count(b" ") >= 2, resp.status_line
    after = await c.request(req("GET", "/after", "Host: t"))
    assert (after.status, after.body) == (200, b"ok")


@pytest.mark.parametrize("status", [b"600", b"099", b"999"])
async def test_status_code_outside_100_599_is_502(proxied, client, status):
    # RFC 9110 15: status codes are 100..599; anything else is a malformed response.
    _up, gw = await proxied(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok")
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: t"))
    assert resp.status == 502, resp.status_line


@pytest.mark.parametrize("status", [299, 599])
async def test_unregistered_status_codes_in_range_pass_through(proxied, client, status):
    _up, gw = await proxied(b"HTTP/1.1 %d Custom Reason\r\nContent-Length: 2\r\n\r\nok" % status)
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: t"))
    assert resp.status_line == b"HTTP/1.1 %d Custom Reason" % status
    assert resp.body == b"ok"


async def test_unsolicited_101_switching_protocols_is_502(proxied, client):
    # RFC 9110 15.2.2: a server MUST NOT switch to a protocol the client did not ask for in
    # Upgrade; graygate must not relay that switch to a client that never asked.
    _up, gw = await proxied(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
    )
    c = await client(gw.port)
    await c.send(req("GET", "/", "Host: t"))
    raw = await c.rest(2.0)
    assert status_of(raw) == 502, raw[:200]


# -- Date (RFC 9110 6.6.1) --------------------------------------------------------------------


async def test_upstream_date_is_passed_through(proxied, client):
    date = b"Tue, 15 Nov 1994 08:12:31 GMT"
    _up, gw = await proxied(
        b"HTTP/1.1 200 OK\r\nDate: " + date + b"\r\nContent-Length: 2\r\n\r\nok"
    )
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: t"))
    assert resp.all("date") == [date]


async def test_date_added_when_the_upstream_sent_none(proxied, client):
    # "A recipient with a clock that receives a response message without a Date header field
    # MUST record the time it was received and append a corresponding Date header field to
    # the message's header section if it is cached or forwarded downstream."
    _up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: t"))
    assert resp.status == 200
    dates = resp.all("date")
    assert len(dates) == 1, resp.headers
    assert email.utils.parsedate_to_datetime(dates[0].decode()) is not None


@pytest.fixture
async def host_only(upstream, gateway):
    """A gateway whose one route serves only Host shop.example: other hosts get graygate's 404."""
    up = await upstream()
    route = route_config(up.url, match={"host": "shop.example", "path_prefix": "/"})
    gw = await gateway([route], timeouts=FAST)
    return up, gw


async def test_proxy_made_404_carries_a_date(host_only, client):
    # graygate is the origin of its own 404: "An origin server with a clock MUST generate a
    # Date header field in all 2xx, 3xx, and 4xx responses".
    _up, gw = host_only
    c = await client(gw.port)
    resp = await c.request(req("GET", "/", "Host: other.example"))
    assert resp.status == 404
    dates = resp.all("date")
    assert len(dates) == 1, resp.headers
    assert email.utils.parsedate_to_datetime(dates[0].decode()) is not None


# -- keep-alive after graygate's own answers --------------------------------------------------


LOCAL_ANSWERS = {
    "no_route_get": (req("GET", "/", "Host: other.example"), "GET", 404),
    "no_route_head": (req("HEAD", "/", "Host: other.example"), "HEAD", 404),
    "max_forwards_0": (req("OPTIONS", "/", "Host: shop.example", "Max-Forwards: 0"), "GET", 200),
}


@pytest.mark.parametrize("name", list(LOCAL_ANSWERS))
async def test_connection_stays_in_sync_after_a_proxy_made_answer(host_only, client, name):
    # The request was read whole, so the connection persists (RFC 9112 9.3) and carries
    # exactly one response per request (RFC 9112 9.3.2): nothing unsolicited follows.
    up, gw = host_only
    data, method, status = LOCAL_ANSWERS[name]
    c = await client(gw.port)
    for _ in range(2):
        local = await c.request(data, method=method)
        assert local.status == status
        assert local.get("connection") is None
        assert await c.rest(0.3) == b"", "bytes nobody asked for followed the answer"
    hit = await c.request(req("GET", "/", "Host: shop.example"))
    assert (hit.status, hit.body) == (200, b"ok")
    assert len(up.seen) == 1


# -- request targets (RFC 9112 3.2) -----------------------------------------------------------


async def test_asterisk_form_options_is_forwarded_as_asterisk(proxied, client):
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req("OPTIONS", "*", "Host: t"))
    assert resp.status == 200
    assert [s.line for s in up.seen] == [b"OPTIONS * HTTP/1.1"]


async def test_double_slashes_and_long_query_forwarded_byte_for_byte(proxied, client):
    up, gw = await proxied()
    c = await client(gw.port)
    targets = ["//double//slash/", "/a/./b/../c", "/q?" + "k=v&" * 2000 + "end=%2F"]
    for t in targets:
        resp = await c.request(req("GET", t, "Host: t"))
        assert resp.status == 200
    assert [s.line for s in up.seen] == [f"GET {t} HTTP/1.1".encode() for t in targets]


async def test_fragment_in_request_target_is_never_forwarded(proxied, client):
    # '#' cannot appear in a request-target (RFC 9112 3.2, RFC 3986): refuse with 400 or
    # at least drop the fragment; never hand it to the upstream. graygate refuses: 400.
    up, gw = await proxied()
    raw = await once(gw.port, req("GET", "/page?x=1#frag", "Host: t", "Connection: close"))
    status = status_of(raw)
    assert status == 400, raw[:200]
    assert all(b"#" not in s.line for s in up.seen), [s.line for s in up.seen]


@pytest.mark.parametrize(
    "host", ["a b", "evil.example/path", "user@evil.example", "shop.example:8x"]
)
async def test_host_with_invalid_value_is_400(proxied, host):
    # RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    # HTTP/1.1 request message that [...] contains [...] a Host header field with an
    # invalid field value." Host = uri-host [ ":" port ].
    up, gw = await proxied()
    raw = await once(gw.port, req("GET", "/", f"Host: {host}", "Connection: close"))
    assert status_of(raw) == 400, raw[:200]
    assert up.seen == []


async def test_absolute_form_target_overrides_the_host_field(proxied, client):
    # RFC 9112 3.2.2: with an absolute-form target the received Host is ignored and
    # replaced by the target's authority.
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req("GET", f"http://127.0.0.1:{gw.port}/abs?q=1", "Host: other"))
    assert resp.status == 200
    assert up.seen[0].line == b"GET /abs?q=1 HTTP/1.1"
    assert up.seen[0].all("host") == [f"127.0.0.1:{gw.port}".encode()]


# -- request line and head syntax (RFC 9112 2-3) ----------------------------------------------

BAD_HEADS = {  # with graygate's answer
    "lowercase_method": (b"get / HTTP/1.1\r\nHost: t\r\n\r\n", 501),
    "lowercase_version": (b"GET / http/1.1\r\nHost: t\r\n\r\n", 400),
    "space_after_version": (b"GET / HTTP/1.1 \r\nHost: t\r\n\r\n", 400),
    "whitespace_line_before_fields": (b"GET / HTTP/1.1\r\n X-Evil: 1\r\nHost: t\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(BAD_HEADS))
async def test_malformed_request_line_is_refused(proxied, name):
    # Lowercase method or version, stray SP: an invalid request-line (400, or 501 for a
    # method graygate does not know). Whitespace before the first field line: RFC 9112 2.2
    # says reject, or drop those lines; graygate rejects. Method names are case-sensitive
    # (RFC 9110 9.1): "get" is a method graygate does not know, so 501; the rest are 400.
    up, gw = await proxied()
    data, status = BAD_HEADS[name]
    raw = await once(gw.port, data, timeout=2.0)
    assert status_of(raw) == status, raw[:200]
    assert up.seen == []


async def test_field_names_are_case_insensitive(proxied, client):
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(b"POST /ci HTTP/1.1\r\nhOsT: t\r\nCONTENT-length: 5\r\n\r\nhello")
    assert resp.status == 200
    assert up.seen[0].body == b"hello"
    again = await c.request(req("GET", "/next", "HOST: t"))
    assert again.status == 200
    assert [s.line for s in up.seen] == [b"POST /ci HTTP/1.1", b"GET /next HTTP/1.1"]


EXTENSION_METHODS = {"PURGE": 200, "PROPFIND": 200, "FOO": 501, "X-CUSTOM-1": 501}


@pytest.mark.parametrize("method", list(EXTENSION_METHODS))
async def test_extension_methods_are_forwarded_or_501(proxied, client, method):
    # method = token (RFC 9110 9.1); an unknown method is not a malformed request: a
    # gateway forwards it, or answers 501 Not Implemented -- never 400. graygate forwards
    # the methods its HTTP parser knows (PURGE, PROPFIND) and answers 501 to the others.
    up, gw = await proxied()
    raw = await once(gw.port, req(method, "/m", "Host: t", "Connection: close"))
    status = status_of(raw)
    assert status == EXTENSION_METHODS[method], raw[:200]
    if status == 200:
        assert [s.line for s in up.seen] == [f"{method} /m HTTP/1.1".encode()]


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
async def test_request_body_on_bodiless_methods_is_forwarded_intact(proxied, client, method):
    up, gw = await proxied()
    c = await client(gw.port)
    resp = await c.request(req(method, "/b", "Host: t", "Content-Length: 11", body=b"hello world"))
    assert resp.status == 200
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    resp = await c.request(req(method, "/c", "Host: t", "Transfer-Encoding: chunked", body=chunked))
    assert resp.status == 200
    assert [(s.line, s.body) for s in up.seen] == [
        (f"{method} /b HTTP/1.1".encode(), b"hello world"),
        (f"{method} /c HTTP/1.1".encode(), b"hello world"),
    ]


# -- chunked coding details (RFC 9112 7) ------------------------------------------------------


async def test_chunk_extensions_and_trailers_in_a_request_keep_the_stream_in_sync(proxied, client):
    up, gw = await proxied()
    c = await client(gw.port)
    body = (
        b"5;name=value;flag\r\nhello\r\n"
        b'6;q="quoted;ext"\r\n world\r\n'
        b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    await c.send(
        req("POST", "/t", "Host: t", "Transfer-Encoding: chunked", "Trailer: X-Checksum", body=body)
        + req("GET", "/next", "Host: t")
    )
    first = await c.response()
    second = await c.response()
    assert (first.status, second.status) == (200, 200)
    assert [(s.line, s.body) for s in up.seen] == [
        (b"POST /t HTTP/1.1", b"hello world"),
        (b"GET /next HTTP/1.1", b""),
    ]
    assert up.seen[0].all("trailer") == []  # trailers dropped: Trailer must go with them
    assert up.seen[1].conn == up.seen[0].conn  # the upstream connection stayed in sync too


async def test_chunk_extensions_and_trailers_in_a_response_keep_the_stream_in_sync(proxied, client):
    def answer(s: Seen) -> bytes:
        if b"/t" in s.line:
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                b'5;ext=1\r\nhello\r\n6;a;b="c"\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n'
            )
        return OK

    up, gw = await proxied(answer)
    c = await client(gw.port)
    resp = await c.request(req("GET", "/t", "Host: t"))
    assert resp.status == 200 and resp.body == b"hello world"
    assert resp.get("trailer") is None, "Trailer announced but graygate drops trailers"
    after = await c.request(req("GET", "/after", "Host: t"))
    assert (after.status, after.body) == (200, b"ok")
    assert up.per_connection() == {1: 2}  # the upstream connection was reused in sync


@pytest.mark.parametrize("size_line", [b"5 ;a=b", b"5 "])
async def test_whitespace_around_chunk_extensions_is_valid(proxied, client, size_line):
    # RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    # (and BWS may end the line): a valid body, to be relayed.
    up, gw = await proxied()
    body = size_line + b"\r\nhello\r\n0\r\n\r\n"
    raw = await once(
        gw.port, req("POST", "/ws", "Host: t", "Transfer-Encoding: chunked", body=body)
    )
    assert status_of(raw) == 200, raw[:200]
    assert [(s.line, s.body) for s in up.seen] == [(b"POST /ws HTTP/1.1", b"hello")]


async def test_whitespace_around_chunk_extension_equals_is_refused_cleanly(proxied, client):
    # BWS around "=" inside an extension is valid too, but llhttp refuses it even with its
    # leniencies (documented in the README). The refusal must be a 400, never a silent
    # close, and nothing reaches the upstream.
    up, gw = await proxied()
    body = b"5\t; a = b\r\nhello\r\n0\r\n\r\n"
    raw = await once(
        gw.port, req("POST", "/ws", "Host: t", "Transfer-Encoding: chunked", body=body)
    )
    assert status_of(raw) == 400, raw[:200]
    assert up.seen == []


async def test_obs_fold_in_an_upstream_response_is_never_relayed(proxied, client):
    # RFC 9112 5.2: "A proxy or gateway that receives an obs-fold in a response message [...]
    # MUST either discard the message and replace it with a 502 (Bad Gateway) response [...]
    # or replace each received obs-fold with one or more SP octets prior to [...] forwarding."
    # graygate discards it: a 502.
    folded = b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nContent-Length: 2\r\n\r\nok"
    _up, gw = await proxied(folded, close_after=True)
    c = await client(gw.port)
    await c.send(req("GET", "/fold", "Host: t"))
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 3)
    assert status_of(head) == 502, head
    for line in head.split(b"\r\n")[1:]:
        assert not line[:1].isspace(), f"obs-fold relayed: {head!r}"
    if status_of(head) == 200:
        value = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"x-folded"))
        assert value.split(b":", 1)[1].split() == [b"first", b"second"]
