"""Who may reach the admin API: the Host and Origin checks against DNS rebinding and
cross-site requests, the bearer token, and the refusal to listen beyond loopback without
one. The middlewares answer 401 or 403 before any handler runs; host names are parsed by
core/hosts.py.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.control.api import API, CTX, error_body, json_response
from proxy.core.hosts import strict_host_name


def check_admin_exposure(listen_host: str, token: str | None) -> None:
    """Refuse an admin API reachable beyond this machine without a token."""
    if token:
        return
    host = listen_host.strip("[]")
    if host == "localhost":
        return
    with contextlib.suppress(ValueError):  # a name, not an address: not loopback
        if ipaddress.ip_address(host).is_loopback:
            return
    raise ValueError(
        f"admin.listen: the admin API would listen on {listen_host!r}, beyond loopback, "
        "without a token; set admin.token (e.g. token: ${GRAYGATE_ADMIN_TOKEN}) or listen "
        "on 127.0.0.1"
    )


# ---- Host and Origin -----------------------------------------------------------------------
# DNS rebinding: a page the operator visits points its own name at 127.0.0.1; the browser
# then sends that name as Host. Cross-site requests: a page posts to http://127.0.0.1:9901
# with its own Origin. Both are refused before auth and before any handler. Probes are
# exempt: kubelet sends the pod IP (or whatever `host:` says) and a probe changes nothing.

UNCHECKED_PATHS = frozenset({"/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD"})  # OPTIONS is checked: a CORS preflight is not safe
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # none: typed URL, bookmark, curl


def _address_name(host: str) -> str | None:
    """A listen or socket host ("::1", "10.0.0.5", "admin.local") as strict_host_name gives it."""
    return strict_host_name(f"[{host}]" if ":" in host else host)


def host_allowed(host: str, local_ip: str, listen_host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header value names this admin listener: localhost or a loopback
    address, the listen host, the address the connection arrived on (so a pod IP works on
    a wildcard listener), or an `allowed` name; "*" allows any. The port is not compared:
    rebinding controls only the name, and port-forwards change the port.

    >>> host_allowed("localhost:8000", "127.0.0.1", "127.0.0.1", ())
    True
    >>> host_allowed("evil.example:9901", "127.0.0.1", "127.0.0.1", ())
    False
    """
    name = strict_host_name(host) if host else None
    if name is None:
        return False
    if "*" in allowed or name == "localhost" or name in allowed:
        return True
    if listen_host not in ("0.0.0.0", "::", "") and name == _address_name(listen_host):
        return True
    if local_ip and name == _address_name(local_ip):
        return True
    with contextlib.suppress(ValueError):  # a name, and none of ours
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    return False


def _cross_origin(request: web.Request) -> tuple[str, str] | None:
    """(field, message) when a request comes from a page of another origin than ours."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in SAME_ORIGIN_FETCH:
        return "Sec-Fetch-Site", f"Sec-Fetch-Site: {site}: only same-origin pages may change state"
    origin = request.headers.get("Origin")
    if origin is not None:
        own = "http://" + request.headers.get("Host", "").strip().lower()
        if origin.strip().lower() != own:
            return "Origin", f"Origin {origin!r} is not this admin's own origin {own!r}"
    return None


def _forbidden(code: str, message: str, field: str) -> web.Response:
    return json_response(error_body(code, message, field), 403)


@web.middleware
async def host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNCHECKED_PATHS:
        return await handler(request)
    ctx = request.app[CTX]
    host = request.headers.get("Host", "")
    transport = request.transport
    sock = transport.get_extra_info("sockname") if transport is not None else None
    local_ip = sock[0] if isinstance(sock, tuple) else ""
    if not host_allowed(host, local_ip, ctx.listen_host, ctx.allowed_hosts):
        return _forbidden(
            "forbidden_host",
            f"Host {host!r} does not name this admin listener; "
            "use localhost or its address, or list the name in admin.allowed_hosts",
            "Host",
        )
    if request.method not in SAFE_METHODS:
        refused = _cross_origin(request)
        if refused is not None:
            return _forbidden("cross_origin", refused[1], refused[0])
    return await handler(request)


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[CTX].token
    path = request.path
    # Checked before any handler runs, so a 401 never reveals whether a route exists.
    if token and (path == API or path.startswith(API + "/")):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return json_response(
                error_body("unauthorized", "missing or wrong bearer token"),
                401,
                {"WWW-Authenticate": 'Bearer realm="graygate"'},
            )
    return await handler(request)
