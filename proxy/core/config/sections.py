"""Parsing of the top-level sections: admin, state, timeouts, limits, listen/TLS and
notifications. Routes are parsed in routes.py, their rollout in rollout.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re

from proxy.core.config.model import (
    BACKENDS,
    NOTIFY_FORMATS,
    TLS_VERSIONS,
    Address,
    AdminConfig,
    Config,
    ConfigError,
    Limits,
    NotificationConfig,
    StateConfig,
    Timeouts,
    TlsConfig,
)
from proxy.core.config.values import (
    _choice,
    _fail,
    _int,
    _is_hostname,
    _is_loopback,
    _key,
    _list,
    _name,
    _positive_duration,
    _str,
    _str_or_empty,
    _table,
    _token,
    _webhook_url,
    parse_address,
    parse_duration,
    parse_size,
)
from proxy.core.hosts import address_form

# --- sections --------------------------------------------------------------------------------

_TIMEOUT_KEYS = tuple(Timeouts.__dataclass_fields__)


def _admin(value: object, path: str) -> AdminConfig:
    t = _table(value, path, ("listen", "token", "token_file", "allowed_hosts"))
    listen = AdminConfig().listen
    if "listen" in t:
        listen = parse_address(t["listen"], _key(path, "listen"))
    token: str | None = None
    if t.get("token") is not None:
        token = _str_or_empty(t["token"], _key(path, "token")).strip() or None
    if t.get("token_file") is not None:
        file_path = _key(path, "token_file")
        name = _str(t["token_file"], file_path)
        if token is not None:
            _fail(file_path, "set admin.token or admin.token_file, not both")
        try:
            with open(name, encoding="utf-8") as f:
                token = f.read().strip() or None
        except OSError as exc:
            raise ConfigError(file_path, f"cannot read: {exc.strerror}", name) from exc
    if token is None and not _is_loopback(listen.host):
        _fail(
            _key(path, "token"),
            f"is required when admin.listen ({listen}) is not a loopback address; "
            "set admin.token or admin.token_file",
        )
    hosts_path = _key(path, "allowed_hosts")
    hosts = _list(t.get("allowed_hosts", []), hosts_path, 'host names or IPs ("graygate.internal")')
    allowed = tuple(_allowed_host(h, f"{hosts_path}[{i}]") for i, h in enumerate(hosts))
    return AdminConfig(listen=listen, token=token, allowed_hosts=allowed)


def _allowed_host(value: object, path: str) -> str:
    """One admin.allowed_hosts entry, as the name part of a Host header compares to it."""
    help_ = (
        'must be a host name or IP address without a port or scheme ("graygate.internal"), or "*"'
    )
    text = _str(value, path).strip().lower()
    if text == "*":
        return text
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    with contextlib.suppress(ValueError):  # not an address: a name, checked below
        return address_form(ipaddress.ip_address(bare))
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and _is_hostname(host.rstrip(".")):
        _fail(path, f"{help_}; write it without a port (the port is never compared)", value)
    text = text.rstrip(".")
    if not _is_hostname(text):
        _fail(path, help_, value)
    return text


def _state(value: object, path: str) -> StateConfig:
    t = _table(value, path, ("backend", "path", "redis_url", "redis_prefix", "lease"))
    d = StateConfig()
    backend = _choice(t.get("backend", d.backend), _key(path, "backend"), BACKENDS)
    url = _str(t.get("redis_url", d.redis_url), _key(path, "redis_url"))
    if not url.startswith(("redis://", "rediss://", "unix://")):
        _fail(_key(path, "redis_url"), "must start with redis://, rediss:// or unix://", url)
    return StateConfig(
        backend=backend,
        path=_str(t.get("path", d.path), _key(path, "path")),
        redis_url=url,
        redis_prefix=_str(t.get("redis_prefix", d.redis_prefix), _key(path, "redis_prefix")),
        lease=_lease(t.get("lease", d.lease), _key(path, "lease")),
    )


def _lease(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds < 0.3:
        _fail(path, "must be a duration of at least 300ms", value)
    return seconds


def _timeouts(value: object, path: str) -> Timeouts:
    t = _table(value, path, _TIMEOUT_KEYS)
    return Timeouts(**{k: _positive_duration(v, _key(path, k)) for k, v in t.items()})


def _limits(value: object, path: str) -> Limits:
    t = _table(value, path, tuple(Limits.__dataclass_fields__))
    d = Limits()
    body = t.get("max_body_bytes")
    header = parse_size(
        t.get("max_header_bytes", d.max_header_bytes), _key(path, "max_header_bytes")
    )
    if header < 1024:
        _fail(_key(path, "max_header_bytes"), "must be at least 1024 bytes", header)
    return Limits(
        max_header_bytes=header,
        max_body_bytes=None if body is None else parse_size(body, _key(path, "max_body_bytes")),
        max_connections_per_endpoint=_int(
            t.get("max_connections_per_endpoint", d.max_connections_per_endpoint),
            _key(path, "max_connections_per_endpoint"),
            1,
        ),
        max_idle_per_endpoint=_int(
            t.get("max_idle_per_endpoint", d.max_idle_per_endpoint),
            _key(path, "max_idle_per_endpoint"),
            0,
        ),
        max_pending=_int(t.get("max_pending", d.max_pending), _key(path, "max_pending"), 0),
    )


def _trusted_proxies(
    value: object, path: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for i, item in enumerate(_list(value, path, 'IP addresses or CIDRs ("10.0.0.0/8")')):
        p = f"{path}[{i}]"
        try:
            nets.append(ipaddress.ip_network(_str(item, p), strict=False))
        except ValueError:
            _fail(p, 'must be an IP address or CIDR like "10.0.0.0/8" or "::1"', item)
    return tuple(nets)


def _upgrades(value: object, path: str) -> tuple[str, ...]:
    items = _list(value, path, 'Upgrade protocol names ("websocket")')
    names = [_token(v, f"{path}[{i}]", "protocol name").lower() for i, v in enumerate(items)]
    return tuple(dict.fromkeys(names))


def _version_header(value: object, path: str) -> str | None:
    if value is None or value is False:
        return None
    if value is True:
        return Config().version_header
    return _token(value, path, "header name")


# --- listener TLS, notifications, rollout gates ------------------------------------------------


def _listen(value: object, path: str) -> tuple[Address, TlsConfig | None]:
    """`listen: "host:port"`, or `listen: {address: "host:port", tls: {cert, key}}`."""
    if not isinstance(value, dict):
        if not isinstance(value, str):
            _fail(
                path,
                'must be a string "host:port" (quote it in YAML) or a mapping '
                '{address: "host:port", tls: {cert, key}}',
                value,
            )
        return parse_address(value, path), None
    t = _table(value, path, ("address", "tls"), ("address",))
    address = parse_address(t["address"], _key(path, "address"))
    if t.get("tls") is None:
        return address, None
    tpath = _key(path, "tls")
    tls = _table(t["tls"], tpath, ("cert", "key", "min_version"), ("cert", "key"))
    return address, TlsConfig(
        cert=_str(tls["cert"], _key(tpath, "cert")),
        key=_str(tls["key"], _key(tpath, "key")),
        min_version=_choice(
            tls.get("min_version", "TLSv1.2"), _key(tpath, "min_version"), TLS_VERSIONS
        ),
    )


_EVENT_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def _notifications(value: object, path: str) -> tuple[NotificationConfig, ...]:
    if value is None:
        return ()
    keys = tuple(f for f in NotificationConfig.__dataclass_fields__)
    d = NotificationConfig("", "")
    out: list[NotificationConfig] = []
    for i, item in enumerate(_list(value, path, "webhooks {url, events, format, ...}")):
        p = f"{path}[{i}]"
        t = _table(item, p, keys, ("url",))
        name = _name(t.get("name", str(i)), _key(p, "name"))
        if any(n.name == name for n in out):
            _fail(_key(p, "name"), "duplicate notification name", name)
        epath = _key(p, "events")
        patterns = _list(t.get("events", list(d.events)), epath, 'patterns like "rollout.*"')
        if not patterns:
            _fail(epath, 'must list at least one pattern ("*" for every event)')
        events = []
        for j, pat in enumerate(patterns):
            text = _str(pat, f"{epath}[{j}]")
            if not _EVENT_PATTERN.fullmatch(text):
                _fail(f"{epath}[{j}]", 'must be an event action or a glob like "rollout.*"', pat)
            events.append(text)
        out.append(
            NotificationConfig(
                name=name,
                url=_webhook_url(t["url"], _key(p, "url")),
                events=tuple(events),
                format=_choice(t.get("format", d.format), _key(p, "format"), NOTIFY_FORMATS),
                timeout=_positive_duration(t.get("timeout", d.timeout), _key(p, "timeout")),
                retries=_int(t.get("retries", d.retries), _key(p, "retries"), 0, 10),
                backoff=_positive_duration(t.get("backoff", d.backoff), _key(p, "backoff")),
            )
        )
    return tuple(out)
