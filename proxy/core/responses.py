"""graygate's own answers: the reason phrases it writes and the one-line text body of an
answer it makes itself (errors, no route). Pure: bytes only, no I/O; the data plane
writes them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from proxy.core.headers import Headers, serialize

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    501: b"Not Implemented",
    505: b"HTTP Version Not Supported",
}
TEXT_PLAIN = b"text/plain; charset=utf-8"
ALLOW = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE"
SECRET_FIELDS = frozenset({b"authorization", b"cookie", b"proxy-authorization"})


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """An answer graygate makes itself; `code` goes out as X-Graygate-Error."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return f"{self.status} {REASONS.get(self.status, b'').decode()}: {self.message}\n".encode()


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (
        status,
        REASONS.get(status, b"OK" if status == 200 else b"Error"),
    )


def answer_fields(answer: LocalAnswer) -> Headers:
    fields: Headers = [(b"content-type", TEXT_PLAIN), (b"x-graygate-error", answer.code.encode())]
    if answer.status == 503:
        fields.append((b"retry-after", b"1"))
    return fields


def own_response(
    status: int,
    headers: Headers,
    body: bytes,
    date: bytes,
    extra: Iterable[tuple[bytes, bytes]],
    keep_alive: bool,
    http11: bool,
    head_only: bool,
) -> tuple[bytes, ...]:
    """Head (and body, but not to a HEAD) of an answer graygate makes itself."""
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"date", date))
    headers.extend(extra)
    if not keep_alive:
        headers.append((b"connection", b"close"))
    elif not http11:
        headers.append((b"connection", b"keep-alive"))
    head = serialize(status_line(status), headers)
    return (head,) if head_only else (head, body)


def max_forwards(method: bytes, target: bytes, headers: Headers) -> tuple[Headers, bytes] | None:
    """RFC 9110 7.6.2: OPTIONS or TRACE with `Max-Forwards: 0` is answered by us: the
    answer's fields and body. Any other value is decremented in `headers`; None then."""
    for i, (name, value) in enumerate(headers):
        if name != b"max-forwards":
            continue
        try:
            hops = int(value)
        except ValueError:
            return None  # not a number: forwarded untouched, as an unknown field
        if hops > 0:
            headers[i] = (name, str(hops - 1).encode())
            return None
        if method == b"OPTIONS":
            return [(b"allow", ALLOW)], b""
        # The request as received, minus credentials (no cross-site tracing).
        echo = [(n, v) for n, v in headers if n not in SECRET_FIELDS]
        body = method + b" " + target + b" HTTP/1.1\r\n"
        body += b"".join(n + b": " + v + b"\r\n" for n, v in echo) + b"\r\n"
        return [(b"content-type", b"message/http")], body
    return None
