"""The verdict on a parsed request head: version, Host, target form (origin, asterisk,
absolute with a host of ours), declared body size. Returns graygate's refusal or the
path, target and Host to forward; the client side calls it once per request.
"""

from __future__ import annotations

import re
from typing import Final, Protocol

import httptools

from proxy.core.headers import Headers
from proxy.core.responses import LocalAnswer
from proxy.dataplane.gateway import Gateway

# uri-host [":" port] (RFC 3986 3.2.2): an IP literal, or reg-name characters.
FRAGMENT: Final = LocalAnswer(400, "bad_request", "a fragment is not part of a request target")
HOST_RE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


class ParsedURL(Protocol):
    """httptools.parse_url's result as it is at run time: an absent part is None, though
    the stubs say bytes and int (compiled code would raise TypeError on that None)."""

    @property
    def schema(self) -> bytes | None: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def path(self) -> bytes | None: ...
    @property
    def query(self) -> bytes | None: ...


def parse_url(target: bytes) -> ParsedURL | None:
    """None for a target that is no URL. The declared return type is what keeps compiled
    code from narrowing the result to the stubs' URL and unboxing its None parts."""
    try:
        return httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None


def judge(
    gw: Gateway,
    version: str,
    method: bytes,
    target: bytes,
    host: str,
    headers: Headers,
    host_count: int,
    no_host: bool,
    host_invalid: bool,
    te: bool,
    content_length: int | None,
) -> tuple[LocalAnswer | None, str, bytes, str, Headers]:
    """(refusal or None, path, target, host, headers); an absolute-form target becomes
    origin-form with its authority as the Host."""
    error: LocalAnswer | None = None
    path = ""
    if version not in ("1.1", "1.0"):
        error = LocalAnswer(505, "version", f"HTTP/{version} is not supported")
    elif host_count > 1:
        error = LocalAnswer(400, "bad_request", "more than one Host header")
    elif version == "1.1" and no_host:
        error = LocalAnswer(400, "bad_request", "missing Host header")
    elif te and version == "1.0":
        error = LocalAnswer(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
    elif host_invalid:
        error = LocalAnswer(400, "bad_request", "invalid Host header")  # RFC 9112 3.2
    elif method == b"CONNECT":
        error = LocalAnswer(405, "method_not_allowed", "graygate is not a forward proxy")
    elif target[:1] == b"/":
        # As str (latin-1 maps byte for byte): compiled, `in` and find on str are native
        # code; on bytes they are method calls (and `in` raises and clears a TypeError).
        text = target.decode("latin-1")
        if "#" in text:
            error = FRAGMENT
        else:
            q = text.find("?")
            path = text if q < 0 else text[:q]
    elif target.find(b"#") >= 0:
        error = FRAGMENT
    elif target == b"*" and method == b"OPTIONS":
        path = "/"
    else:
        u = parse_url(target)
        if u is None or u.schema not in (b"http", b"https") or not u.host:
            error = LocalAnswer(400, "bad_request", "invalid request target")
        else:
            authority = u.host.decode("latin-1")
            if gw.is_foreign(authority):
                error = LocalAnswer(400, "foreign_host", "graygate is not an open proxy")
            else:
                path = (u.path or b"/").decode("latin-1")
                target = (u.path or b"/") + (b"?" + u.query if u.query else b"")
                host = authority if u.port is None else f"{authority}:{u.port}"
                headers = [(n, v) for n, v in headers if n != b"host"]
                headers.append((b"host", host.encode("latin-1")))
    limit = gw.max_body_bytes
    if error is None and limit is not None and (content_length or 0) > limit:
        error = LocalAnswer(413, "body_too_large", f"request body exceeds {limit} bytes")
    return error, path, target, host, headers
