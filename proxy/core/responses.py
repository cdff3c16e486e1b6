"""graygate's own answers: the reason phrases it writes and the one-line text body of an
answer it makes itself (errors, no route). Pure: bytes only, no I/O; the data plane
writes them."""

from __future__ import annotations

from dataclasses import dataclass

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
