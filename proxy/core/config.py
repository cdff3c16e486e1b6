"""Configuration: YAML -> frozen dataclasses, validated once at the edge.

Pure: standard library and yaml only. Durations are float seconds, sizes int bytes.
Every error is a ConfigError naming the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TypeVar

import yaml

Role = Literal["canary", "stable"]
Reason = Literal["force_header", "force_cookie", "cohort", "weight", "failover"]
REASONS: tuple[Reason, ...] = ("force_header", "force_cookie", "cohort", "weight", "failover")
Balance = Literal["least_request", "round_robin"]
BALANCES: tuple[Balance, ...] = ("least_request", "round_robin")
Backend = Literal["file", "redis"]
BACKENDS: tuple[Backend, ...] = ("file", "redis")
OnFailure = Literal["rollback", "pause"]
ON_FAILURE: tuple[OnFailure, ...] = ("rollback", "pause")
ForwardedFor = Literal["append", "replace"]
FORWARDED_FOR: tuple[ForwardedFor, ...] = ("append", "replace")
TlsVersion = Literal["TLSv1.2", "TLSv1.3"]
TLS_VERSIONS: tuple[TlsVersion, ...] = ("TLSv1.2", "TLSv1.3")
NotifyFormat = Literal["json", "slack"]
NOTIFY_FORMATS: tuple[NotifyFormat, ...] = ("json", "slack")
GateName = Literal["confirm_step", "confirm_promotion"]
GATE_NAMES: tuple[GateName, ...] = ("confirm_step", "confirm_promotion")
SourceName = Literal["local", "prometheus"]
SOURCES: tuple[SourceName, ...] = ("local", "prometheus")


@dataclass(frozen=True)
class Address:
    host: str  # "0.0.0.0", "127.0.0.1", "::1" (no brackets)
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Endpoint:
    url: str  # as written, normalised without trailing slash: "http://127.0.0.1:9001"
    host: str
    port: int


@dataclass(frozen=True)
class Timeouts:
    connect: float = 2.0  # upstream TCP connect
    read: float = 30.0  # upstream: time to first byte and between chunks
    request: float = 60.0  # overall deadline for one exchange until response headers
    client_header: float = 10.0  # downstream: whole request head must arrive within this
    client_body: float = 30.0  # downstream: idle time allowed between body chunks
    keepalive: float = 75.0  # downstream idle keep-alive connection
    upstream_idle: float = 60.0  # pooled idle upstream connection is closed after this
    # downstream: the longest a client may leave graygate's write buffer full without
    # reading any of it; then the connection is cut (and its upstream freed)
    client_write: float = 60.0


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 65536  # request line + headers
    max_body_bytes: int | None = None  # None: unlimited
    max_connections_per_endpoint: int = 1024  # open (busy + idle) upstream connections
    max_idle_per_endpoint: int = 128
    max_pending: int = 1024  # requests allowed to wait for a pool slot, per endpoint


@dataclass(frozen=True)
class Match:
    host: str = "*"  # "*", exact "shop.example.com", or wildcard "*.example.com"; lowercase
    path_prefix: str = "/"


@dataclass(frozen=True)
class VersionConfig:
    name: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class CohortSource:
    kind: Literal["header", "cookie"]
    name: str  # header names lowercase; cookie names as written


@dataclass(frozen=True)
class CookieConfig:
    name: str = "gg_uid"
    max_age: float = 30 * 86400.0
    secure: bool = False
    path: str = "/"


@dataclass(frozen=True)
class StickyConfig:
    keys: tuple[CohortSource, ...] = ()
    cookie: CookieConfig = field(default_factory=CookieConfig)
    salt: str = ""  # defaults to the route name when empty


@dataclass(frozen=True)
class ForceRule:
    kind: Literal["header", "cookie"]
    name: str  # header names lowercase; cookie names as written
    value: str | None  # exact match, or None when regex is set
    regex: str | None  # re.fullmatch pattern, validated at parse time
    to: str  # a version name, or the roles "canary" / "stable"


@dataclass(frozen=True)
class PauseStep:
    seconds: float | None  # None: wait for a manual resume / promote


@dataclass(frozen=True)
class WeightStep:
    weight: int  # canary weight 0..100


Step = WeightStep | PauseStep


@dataclass(frozen=True)
class PrometheusConfig:
    """Where the `prometheus` metrics source reads every replica's graygate_* series."""

    url: str  # http(s)://host:port[/path], no trailing slash
    timeout: float = 2.0  # per query; slower counts as unreachable
    replicas_selector: str = ""  # extra PromQL label matchers, e.g. 'job="graygate"'
    scrape_interval: float = 15.0  # windows end this long before now (scrape lag)


@dataclass(frozen=True)
class AnalysisConfig:
    min_samples: int = 200
    max_error_rate: float = 0.01
    max_error_rate_increase: float = 0.005
    max_p99_latency: float | None = 0.5
    max_latency_ratio: float | None = 1.5
    confidence: float = 0.99
    exclude_reasons: tuple[Reason, ...] = ("force_header", "force_cookie")
    source: SourceName = "local"  # where the controller reads its windows
    prometheus: PrometheusConfig | None = None  # required with source: prometheus


@dataclass(frozen=True)
class GateConfig:
    url: str  # http(s) URL the controller POSTs the rollout's figures to; 2xx = go on
    timeout: float = 5.0  # no answer within this holds the step, like a refusal


@dataclass(frozen=True)
class GatesConfig:
    confirm_step: GateConfig | None = None  # asked before each controller-driven step
    confirm_promotion: GateConfig | None = None  # asked before the controller promotes

    def get(self, name: GateName) -> GateConfig | None:
        return self.confirm_step if name == "confirm_step" else self.confirm_promotion


@dataclass(frozen=True)
class RolloutConfig:
    steps: tuple[Step, ...] = (
        WeightStep(5),
        WeightStep(10),
        WeightStep(25),
        WeightStep(50),
        WeightStep(100),
    )
    interval: float = 30.0
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    failure_limit: int = 2
    on_failure: OnFailure = "rollback"
    max_inconclusive: int = 10
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass(frozen=True)
class OutlierConfig:
    consecutive_failures: int = 5  # connect errors or 5xx in a row
    base_ejection: float = 30.0  # first ejection; doubles each time, capped
    max_ejection: float = 300.0


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str  # GET this path; 2xx/3xx = healthy
    interval: float = 10.0
    timeout: float = 2.0


@dataclass(frozen=True)
class RouteConfig:
    name: str
    match: Match
    versions: tuple[VersionConfig, ...]  # 1 or 2, in config order
    stable: str
    weights: tuple[tuple[str, int], ...]  # (version, percent) for every version; sums to 100
    sticky: StickyConfig | None = None  # None: per-request weighted choice
    force: tuple[ForceRule, ...] = ()
    failover: bool = False
    balance: Balance = "least_request"
    retries: int = 1  # extra connect attempts on other endpoints of the same version
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    health_check: HealthCheckConfig | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def version(self, name: str) -> VersionConfig:
        for v in self.versions:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def version_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.versions)


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 9901))
    token: str | None = None  # from `token:` (after ${ENV} expansion) or `token_file:`
    # Host names (lowercase, IPv6 in brackets, no port) the admin answers besides loopback
    # and its listen address; "*" answers any Host. See control/guard.host_allowed.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateConfig:
    backend: Backend = "file"
    path: str = "./graygate-state.json"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "graygate"
    lease: float = 3.0  # controller lease (redis); a dead leader's runs out after this


@dataclass(frozen=True)
class TlsConfig:
    cert: str  # PEM file: the certificate, then its intermediates (nginx ssl_certificate)
    key: str  # PEM file: its private key, unencrypted
    min_version: TlsVersion = "TLSv1.2"


@dataclass(frozen=True)
class NotificationConfig:
    name: str  # metric label; defaults to the index in the list
    url: str  # http(s) webhook; only its scheme and host are ever logged
    events: tuple[str, ...] = ("*",)  # fnmatch patterns on event actions: "rollout.*"
    format: NotifyFormat = "json"
    timeout: float = 5.0  # per attempt
    retries: int = 3  # attempts after the first
    backoff: float = 1.0  # wait before the first retry; doubles each time, capped at 30s


@dataclass(frozen=True)
class Config:
    listen: Address = field(default_factory=lambda: Address("0.0.0.0", 8080))
    listen_tls: TlsConfig | None = None  # `listen: {address, tls}`: HTTPS on the listener
    admin: AdminConfig = field(default_factory=AdminConfig)
    state: StateConfig = field(default_factory=StateConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    forwarded_for: ForwardedFor = "append"  # replace: drop an untrusted peer's chain
    version_header: str | None = "X-Graygate-Version"  # None: do not add it
    via: str = "graygate"  # pseudonym in Via: "1.1 graygate"
    grace_period: float = 30.0  # SIGTERM drain time
    workers: int = 1
    access_log: bool = False
    notifications: tuple[NotificationConfig, ...] = ()
    upgrades: tuple[str, ...] = ("websocket",)  # Upgrade protocols that may tunnel, lowercase
    routes: tuple[RouteConfig, ...] = ()
    source: str | None = None  # the file path it was loaded from


# --- errors -----------------------------------------------------------------------------


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: object = _NoValue()  # ConfigError.value when there is no single bad value to show


class ConfigError(Exception):
    """A refused config: `path` is the dotted key ("routes[0].weights.green", "" for the
    whole file), `value` the bad value (NO_VALUE when none), `message` what is allowed."""

    def __init__(self, path: str, message: str, value: object = NO_VALUE) -> None:
        self.path = path
        self.message = message
        self.value = value
        super().__init__(path, message, value)

    def __str__(self) -> str:
        text = self.message
        if self.value is not NO_VALUE:
            text = f"{text}, got {_show(self.value)}"
        return f"{self.path}: {text}" if self.path else text


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(path: str, message: str, value: object = NO_VALUE) -> NoReturn:
    raise ConfigError(path, message, value)


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- scalar parsers -----------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION = re.compile(rf"(?:{_NUM}(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(rf"({_NUM})(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(_NUM)
_DURATION_HELP = (
    'must be a non-negative duration: seconds as a number, or "250ms", "2s", "10m", "1h", '
    '"30d", "1m30s"'
)


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from a number or a string like "250ms", "1.5s", "10m", "1h30m", "30d"."""
    if isinstance(value, bool):
        _fail(path, _DURATION_HELP, value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            _fail(path, _DURATION_HELP, value)
    else:
        _fail(path, _DURATION_HELP, value)
    if not math.isfinite(seconds) or seconds < 0:
        _fail(path, _DURATION_HELP, value)
    return seconds


_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_SIZE_HELP = 'must be a byte size: an integer, or "64k", "1m", "1g" (multiples of 1024)'


def parse_size(value: object, path: str = "") -> int:
    """Bytes from an integer or a string like "65536", "64k", "1m", "1g" (binary multiples)."""
    if isinstance(value, bool):
        _fail(path, _SIZE_HELP, value)
    if isinstance(value, int):
        if value < 0:
            _fail(path, _SIZE_HELP, value)
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m:
            return int(m.group(1)) << (10 * " kmg".index(m.group(2).lower() or " "))
    _fail(path, _SIZE_HELP, value)


def _int(value: object, path: str, lo: int, hi: int | None = None) -> int:
    allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"must be an integer {allowed}", value)
    if value < lo or (hi is not None and value > hi):
        _fail(path, f"must be {allowed}", value)
    return value


def _number(value: object, path: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"must be a number {allowed}", value)
    number = float(value)
    if not math.isfinite(number):
        _fail(path, f"must be a number {allowed}", value)
    return number


def _probability(value: object, path: str) -> float:
    p = _number(value, path, "0..1")
    if not 0.0 <= p <= 1.0:
        _fail(path, "must be 0..1", value)
    return p


def _positive_duration(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        _fail(path, "must be a duration > 0", value)
    return seconds


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, "must be true or false", value)
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "must be a string (quote it in YAML)", value)
    if not value:
        _fail(path, "must not be empty", value)
    return value


_C = TypeVar("_C", bound=str)
_T = TypeVar("_T")


def _choice(value: object, path: str, choices: tuple[_C, ...]) -> _C:
    for c in choices:
        if value == c and isinstance(value, str):
            return c
    _fail(path, f"must be one of {', '.join(choices)}", value)


def _table(
    value: object, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> dict[str, object]:
    """A mapping with only `allowed` keys; null counts as empty so a section whose keys are
    all commented out still loads."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        _fail(path or "config", "must be a mapping", value)
    for k in value:
        if not isinstance(k, str):
            _fail(path or "config", "keys must be strings", k)
        if k not in allowed:
            _fail(_key(path, k), f"unknown key; allowed: {', '.join(allowed)}")
    for k in required:
        if k not in value:
            _fail(_key(path, k), "is required")
    return value


def _list(value: object, path: str, what: str) -> list[object]:
    if not isinstance(value, list):
        _fail(path, f"must be a list of {what}", value)
    return value


# --- names and addresses --------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: header and cookie names
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # route and version names
_NAME_HELP = "must be 1-63 of A-Z a-z 0-9 _ . - starting with a letter or digit"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
ROLES: tuple[Role, ...] = ("canary", "stable")


def _name(value: object, path: str) -> str:
    text = _str(value, path)
    if not _NAME.fullmatch(text):
        _fail(path, _NAME_HELP, value)
    return text


def _token(value: object, path: str, what: str) -> str:
    text = _str(value, path)
    if not _TOKEN.fullmatch(text):
        _fail(path, f"must be a valid {what} (letters, digits and !#$%&'*+.^_`|~-)", value)
    return text


def _is_hostname(host: str) -> bool:
    return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None


def _port(text: str, path: str, value: object, lo: int) -> int:
    if not text.isdigit() or not lo <= int(text) <= 65535:
        _fail(path, f"port must be {lo}..65535", value)
    return int(text)


def parse_address(value: object, path: str) -> Address:
    """A listen address: "host:port", "[::1]:8080", or ":8080" (all IPv4 interfaces)."""
    help_ = 'must be "host:port", "[ipv6]:port" or ":port"'
    text = _str(value, path)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            _fail(path, help_, value)
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _fail(path, f"{help_}; {host!r} is not an IPv6 address", value)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            _fail(path, help_, value)
        if ":" in host:
            _fail(path, f"{help_}; IPv6 addresses need brackets", value)
        host = host or "0.0.0.0"
        if not _is_hostname(host):
            _fail(path, f"{help_}; {host!r} is not a host name or address", value)
    return Address(host.lower(), _port(port_text, path, value, lo=0))


def parse_endpoint(value: object, path: str) -> Endpoint:
    """An upstream URL: http://host[:port] (port 80 by default), no path, query or user."""
    help_ = 'must be "http://host:port" (scheme http, no path, query or user info)'
    text = _str(value, path).strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        _fail(path, help_, value)
    if parts.scheme != "http":
        _fail(path, f"{help_}; scheme {parts.scheme or '(none)'!r} is not http", value)
    if "@" in parts.netloc:
        _fail(path, help_, value)
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        _fail(path, f"{help_}; remove the path, query or fragment", value)
    host = parts.hostname or ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _fail(path, help_, value)
        if "[" not in parts.netloc:
            _fail(path, f"{help_}; IPv6 addresses need brackets", value)
    elif not host or not _is_hostname(host):
        _fail(path, f"{help_}; a host is required", value)
    port = 80 if port is None else port
    if port == 0:
        _fail(path, f"{help_}; port must be 1..65535", value)
    return Endpoint(url=text.rstrip("/"), host=host, port=port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- ${ENV} expansion -------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_str(text: str, env: Mapping[str, str], path: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":  # escaped: a literal "${"
            return "${"
        inner = m.group(1)
        if inner is None:
            _fail(path, "unclosed ${ in environment reference", text)
        name, sep, default = inner.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            _fail(path, "malformed environment reference; use ${NAME} or ${NAME:-default}", text)
        found = env.get(name)
        if sep:
            return found if found else default
        if found is None:
            _fail(
                path,
                f"environment variable {name} is not set (use ${{{name}:-default}} for a default)",
            )
        return found

    return _ENV_REF.sub(one, text) if "$" in text else text


def _expand(value: object, env: Mapping[str, str], path: str) -> object:
    if isinstance(value, str):
        return _expand_str(value, env, path)
    if isinstance(value, dict):
        return {k: _expand(v, env, _key(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


# --- sections --------------------------------------------------------------------------------

_TOP_KEYS = (
    "listen",
    "admin",
    "state",
    "timeouts",
    "limits",
    "trusted_proxies",
    "forwarded_for",
    "version_header",
    "via",
    "grace_period",
    "workers",
    "access_log",
    "notifications",
    "upgrades",
    "analysis",
    "routes",
)
_ROUTE_KEYS = (
    "name",
    "match",
    "versions",
    "stable",
    "weights",
    "sticky",
    "force",
    "failover",
    "balance",
    "retries",
    "outlier",
    "health_check",
    "rollout",
)
_TIMEOUT_KEYS = tuple(Timeouts.__dataclass_fields__)
_ANALYSIS_KEYS = tuple(AnalysisConfig.__dataclass_fields__)
_SOURCE_KEYS = ("source", "prometheus")  # the top-level `analysis:` holds only these


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
        ip = ipaddress.ip_address(bare)
        return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and _is_hostname(host.rstrip(".")):
        _fail(path, f"{help_}; write it without a port (the port is never compared)", value)
    text = text.rstrip(".")
    if not _is_hostname(text):
        _fail(path, help_, value)
    return text


def _str_or_empty(value: object, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "must be a string (quote it in YAML)", value)
    return value


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


def _webhook_url(value: object, path: str) -> str:
    help_ = 'must be an http:// or https:// URL with a host, e.g. "https://hooks.example.com/x"'
    text = _str(value, path).strip()
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        _fail(path, help_, value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(path, help_, value)
    return text


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


def _gates(value: object, path: str) -> GatesConfig:
    t = _table(value, path, GATE_NAMES)
    gates: dict[str, GateConfig | None] = {}
    for name in GATE_NAMES:
        if t.get(name) is None:
            gates[name] = None
            continue
        p = _key(path, name)
        g = _table(t[name], p, ("url", "timeout"), ("url",))
        gates[name] = GateConfig(
            url=_webhook_url(g["url"], _key(p, "url")),
            timeout=_positive_duration(g.get("timeout", 5.0), _key(p, "timeout")),
        )
    return GatesConfig(**gates)


# --- routes -----------------------------------------------------------------------------------


def _match(value: object, path: str) -> Match:
    t = _table(value, path, ("host", "path_prefix"))
    host = _str(t.get("host", "*"), _key(path, "host")).lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if host != "*" and not _is_hostname(bare):
        _fail(
            _key(path, "host"),
            'must be "*", an exact host name ("shop.example.com") or "*.example.com" (no port)',
            t["host"],
        )
    prefix = _str(t.get("path_prefix", "/"), _key(path, "path_prefix"))
    if not prefix.startswith("/") or any(c in prefix for c in "?# \t"):
        _fail(_key(path, "path_prefix"), 'must start with "/" and have no query or spaces', prefix)
    return Match(host=host, path_prefix=prefix)


def _versions(value: object, path: str) -> tuple[VersionConfig, ...]:
    if not isinstance(value, dict):
        _fail(path, "must be a mapping of version name -> {endpoints: [...]}", value)
    if not 1 <= len(value) <= 2:
        _fail(path, f"must name 1 or 2 versions, got {len(value)}: {', '.join(map(str, value))}")
    versions = []
    for name, body in value.items():
        vpath = _key(path, str(name))
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            _fail(vpath, f"version name {_NAME_HELP}", name)
        if name in ROLES:
            _fail(vpath, "canary and stable are role names; name versions e.g. blue and green")
        t = _table(body, vpath, ("endpoints",), ("endpoints",))
        epath = _key(vpath, "endpoints")
        items = _list(t["endpoints"], epath, 'URLs like "http://127.0.0.1:9001"')
        if not items:
            _fail(epath, "must list at least one endpoint")
        endpoints: list[Endpoint] = []
        for i, item in enumerate(items):
            ep = parse_endpoint(item, f"{epath}[{i}]")
            if any((e.host, e.port) == (ep.host, ep.port) for e in endpoints):
                _fail(f"{epath}[{i}]", "duplicate endpoint", item)
            endpoints.append(ep)
        versions.append(VersionConfig(name=name, endpoints=tuple(endpoints)))
    return tuple(versions)


def _weights(
    value: object, path: str, names: tuple[str, ...], stable: str
) -> tuple[tuple[str, int], ...]:
    if value is None:
        return tuple((n, 100 if n == stable else 0) for n in names)
    return parse_weights(value, path, names)


def parse_weights(value: object, path: str, names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Weights for every version (integers 0..100 summing to 100), in `names` order. The one
    rule for the config file, the admin API and stored states; errors name `path.version`."""
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping of version -> percent for {', '.join(names)}", value)
    for k in value:
        if k not in names:
            _fail(_key(path, str(k)), f"unknown version; versions: {', '.join(names)}")
    weights = []
    for n in names:
        if n not in value:
            _fail(_key(path, n), f"missing weight for version {n}; give every version a weight")
        weights.append((n, _int(value[n], _key(path, n), 0, 100)))
    total = sum(w for _, w in weights)
    if total != 100:
        _fail(path, "weights must sum to 100", total)
    return tuple(weights)


def _cohort_source(value: object, path: str) -> CohortSource:
    text = _str(value, path)
    kind, sep, name = text.partition(":")
    if not sep or kind not in ("header", "cookie") or not name:
        _fail(path, 'must be "header:<Name>" or "cookie:<name>"', value)
    if kind == "header":
        return CohortSource("header", _token(name, path, "header name").lower())
    return CohortSource("cookie", _token(name, path, "cookie name"))


def _sticky(value: object, path: str) -> StickyConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        return StickyConfig()
    t = _table(value, path, ("keys", "cookie", "salt"))
    kpath = _key(path, "keys")
    keys = tuple(
        _cohort_source(item, f"{kpath}[{i}]")
        for i, item in enumerate(_list(t.get("keys", []), kpath, '"header:X" / "cookie:y" keys'))
    )
    cpath = _key(path, "cookie")
    c = _table(t.get("cookie"), cpath, ("name", "max_age", "secure", "path"))
    d = CookieConfig()
    cookie_path = _str(c.get("path", d.path), _key(cpath, "path"))
    if not cookie_path.startswith("/") or ";" in cookie_path:
        _fail(_key(cpath, "path"), 'must start with "/" and contain no ";"', cookie_path)
    cookie = CookieConfig(
        name=_token(c.get("name", d.name), _key(cpath, "name"), "cookie name"),
        max_age=_positive_duration(c.get("max_age", d.max_age), _key(cpath, "max_age")),
        secure=_bool(c.get("secure", d.secure), _key(cpath, "secure")),
        path=cookie_path,
    )
    salt = _str_or_empty(t.get("salt", ""), _key(path, "salt"))
    return StickyConfig(keys=keys, cookie=cookie, salt=salt)


def _force(value: object, path: str, names: tuple[str, ...]) -> tuple[ForceRule, ...]:
    rules = []
    allowed_to = (*names, *ROLES)
    for i, item in enumerate(_list(value, path, "rules {header|cookie, value|regex, to}")):
        p = f"{path}[{i}]"
        t = _table(item, p, ("header", "cookie", "value", "regex", "to"), ("to",))
        if ("header" in t) == ("cookie" in t):
            _fail(p, "set exactly one of header or cookie")
        if ("value" in t) == ("regex" in t):
            _fail(p, "set exactly one of value or regex")
        kind: Literal["header", "cookie"] = "header" if "header" in t else "cookie"
        name = _token(t[kind], _key(p, kind), f"{kind} name")
        value_: str | None = None
        regex: str | None = None
        if "value" in t:
            value_ = _str(t["value"], _key(p, "value"))
        else:
            regex = _str(t["regex"], _key(p, "regex"))
            try:
                re.compile(regex)
            except re.error as exc:
                _fail(_key(p, "regex"), f"invalid regular expression: {exc}", regex)
        to = t["to"]
        if not isinstance(to, str) or to not in allowed_to:
            _fail(_key(p, "to"), f"must be one of {', '.join(allowed_to)}", to)
        rules.append(
            ForceRule(
                kind=kind,
                name=name.lower() if kind == "header" else name,
                value=value_,
                regex=regex,
                to=to,
            )
        )
    return tuple(rules)


def _outlier(value: object, path: str) -> OutlierConfig:
    t = _table(value, path, ("consecutive_failures", "base_ejection", "max_ejection"))
    d = OutlierConfig()
    base = _positive_duration(t.get("base_ejection", d.base_ejection), _key(path, "base_ejection"))
    top = _positive_duration(t.get("max_ejection", d.max_ejection), _key(path, "max_ejection"))
    if top < base:
        _fail(
            _key(path, "max_ejection"), f"must be >= base_ejection ({base:g}s)", t["max_ejection"]
        )
    return OutlierConfig(
        consecutive_failures=_int(
            t.get("consecutive_failures", d.consecutive_failures),
            _key(path, "consecutive_failures"),
            1,
        ),
        base_ejection=base,
        max_ejection=top,
    )


def _health_check(value: object, path: str) -> HealthCheckConfig | None:
    if value is None:
        return None
    t = _table(value, path, ("path", "interval", "timeout"), ("path",))
    probe = _str(t["path"], _key(path, "path"))
    if not probe.startswith("/") or any(c.isspace() for c in probe):
        _fail(_key(path, "path"), 'must start with "/" and contain no spaces', probe)
    return HealthCheckConfig(
        path=probe,
        interval=_positive_duration(t.get("interval", 10.0), _key(path, "interval")),
        timeout=_positive_duration(t.get("timeout", 2.0), _key(path, "timeout")),
    )


def parse_steps(value: object, path: str) -> tuple[Step, ...]:
    """Rollout steps: weights 1..100 strictly increasing, and pause entries. The one rule
    for the config file, `POST .../rollout` and `graygate rollout start --steps`."""
    help_ = "weights 1..100 and {pause: true} / {pause: <duration>} entries"
    items = _list(value, path, help_)
    if not items:
        _fail(path, f"must be a non-empty list of {help_}")
    steps: list[Step] = []
    last = 0
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        if isinstance(item, dict):
            pause = _table(item, p, ("pause",), ("pause",))["pause"]
            if pause is True:
                steps.append(PauseStep(None))
            elif pause is False or pause is None:
                _fail(_key(p, "pause"), "must be true (wait for resume) or a duration", pause)
            else:
                steps.append(PauseStep(_positive_duration(pause, _key(p, "pause"))))
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            _fail(p, f"must be a weight 1..100 or a pause entry ({help_})", item)
        weight = _int(item, p, 1, 100)
        if weight <= last:
            _fail(p, f"steps must increase; the previous weight step is {last}", weight)
        last = weight
        steps.append(WeightStep(weight))
    return tuple(steps)


def _analysis(value: object, path: str, inherited: AnalysisConfig | None = None) -> AnalysisConfig:
    t = _table(value, path, _ANALYSIS_KEYS)
    d = AnalysisConfig()
    source, prometheus = _metrics_source(t, path, inherited or d)

    def get(key: str, parse: Callable[[object, str], _T], default: _T) -> _T:
        return parse(t[key], _key(path, key)) if key in t else default

    def optional(parse: Callable[[object, str], float]) -> Callable[[object, str], float | None]:
        return lambda v, p: None if v is None else parse(v, p)

    def ratio(v: object, p: str) -> float:
        r = _number(v, p, "> 0")
        if r <= 0:
            _fail(p, "must be > 0", v)
        return r

    def confidence(v: object, p: str) -> float:
        c = _number(v, p, "between 0.5 and 1 (exclusive)")
        if not 0.5 < c < 1.0:
            _fail(p, "must be between 0.5 and 1 (exclusive), e.g. 0.95 or 0.99", v)
        return c

    def reasons(v: object, p: str) -> tuple[Reason, ...]:
        items = _list(v, p, f"reasons ({', '.join(REASONS)})")
        return tuple(_choice(r, f"{p}[{i}]", REASONS) for i, r in enumerate(items))

    return AnalysisConfig(
        min_samples=get("min_samples", lambda v, p: _int(v, p, 1), d.min_samples),
        max_error_rate=get("max_error_rate", _probability, d.max_error_rate),
        max_error_rate_increase=get(
            "max_error_rate_increase", _probability, d.max_error_rate_increase
        ),
        max_p99_latency=get("max_p99_latency", optional(_positive_duration), d.max_p99_latency),
        max_latency_ratio=get("max_latency_ratio", optional(ratio), d.max_latency_ratio),
        confidence=get("confidence", confidence, d.confidence),
        exclude_reasons=get("exclude_reasons", reasons, d.exclude_reasons),
        source=source,
        prometheus=prometheus,
    )


# --- metrics source of the rollout analysis (several replicas: prometheus) ------------------

# PromQL label matchers: name op "value", comma-separated; no braces, so a selector can be
# pasted inside every query's {...} without changing its meaning.
_MATCHER = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"(?:{_MATCHER}(?:,{_MATCHER})*)?,?\s*")


def _prometheus(value: object, path: str) -> PrometheusConfig:
    t = _table(value, path, tuple(PrometheusConfig.__dataclass_fields__), ("url",))
    url = _str(t["url"], _key(path, "url")).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        _fail(_key(path, "url"), 'must be "http(s)://host:port[/path]" without a query', url)
    selector = t.get("replicas_selector", "")
    selector_path = _key(path, "replicas_selector")
    if not isinstance(selector, str) or not _SELECTOR.fullmatch(selector):
        _fail(selector_path, "must be PromQL label matchers like 'job=\"graygate\"'", selector)
    d = PrometheusConfig(url)
    return PrometheusConfig(
        url=url,
        timeout=_positive_duration(t.get("timeout", d.timeout), _key(path, "timeout")),
        replicas_selector=selector.strip().rstrip(",").strip(),
        scrape_interval=_positive_duration(
            t.get("scrape_interval", d.scrape_interval), _key(path, "scrape_interval")
        ),
    )


def _metrics_source(
    t: dict[str, object], path: str, inherited: AnalysisConfig
) -> tuple[SourceName, PrometheusConfig | None]:
    """`source` and `prometheus` of one analysis table; unset keys come from `inherited`
    (the top-level `analysis:`)."""
    source = inherited.source
    if "source" in t:
        source = _choice(t["source"], _key(path, "source"), SOURCES)
    prometheus = inherited.prometheus
    if t.get("prometheus") is not None:
        prometheus = _prometheus(t["prometheus"], _key(path, "prometheus"))
    if source == "prometheus" and prometheus is None:
        _fail(
            _key(path, "prometheus"),
            "is required with source: prometheus ({url: ...}; here or in the top-level analysis)",
        )
    return source, prometheus


def _global_source(value: object, path: str) -> AnalysisConfig:
    t = _table(value, path, _SOURCE_KEYS)
    source, prometheus = _metrics_source(t, path, AnalysisConfig())
    return AnalysisConfig(source=source, prometheus=prometheus)


def _check_window(interval: float, analysis: AnalysisConfig, path: str) -> None:
    # increase() needs two samples of every series inside a window.
    prom = analysis.prometheus
    if analysis.source == "prometheus" and prom is not None and interval < 2 * prom.scrape_interval:
        _fail(
            _key(path, "interval"),
            f"must be at least 2 scrape intervals ({format_duration(2 * prom.scrape_interval)}) "
            "with source: prometheus",
            interval,
        )


def _lease(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds < 0.3:
        _fail(path, "must be a duration of at least 300ms", value)
    return seconds


def _rollout(value: object, path: str, inherited: AnalysisConfig | None = None) -> RolloutConfig:
    t = _table(
        value,
        path,
        (
            "steps",
            "interval",
            "analysis",
            "failure_limit",
            "on_failure",
            "max_inconclusive",
            "gates",
        ),
    )
    d = RolloutConfig()
    interval = _positive_duration(t.get("interval", d.interval), _key(path, "interval"))
    analysis = _analysis(t.get("analysis"), _key(path, "analysis"), inherited)
    _check_window(interval, analysis, path)
    return RolloutConfig(
        steps=parse_steps(t["steps"], _key(path, "steps")) if "steps" in t else d.steps,
        interval=interval,
        analysis=analysis,
        failure_limit=_int(t.get("failure_limit", d.failure_limit), _key(path, "failure_limit"), 1),
        on_failure=_choice(t.get("on_failure", d.on_failure), _key(path, "on_failure"), ON_FAILURE),
        max_inconclusive=_int(
            t.get("max_inconclusive", d.max_inconclusive), _key(path, "max_inconclusive"), 1
        ),
        gates=_gates(t.get("gates"), _key(path, "gates")),
    )


def _route(value: object, path: str, inherited: AnalysisConfig | None = None) -> RouteConfig:
    t = _table(value, path, _ROUTE_KEYS, ("name", "versions"))
    name = _name(t["name"], _key(path, "name"))
    versions = _versions(t["versions"], _key(path, "versions"))
    names = tuple(v.name for v in versions)
    if "stable" in t:
        stable = t["stable"]
        if not isinstance(stable, str) or stable not in names:
            _fail(_key(path, "stable"), f"must be one of the versions: {', '.join(names)}", stable)
    elif len(names) == 1:
        stable = names[0]
    else:
        _fail(_key(path, "stable"), f"is required with two versions; one of {', '.join(names)}")
    return RouteConfig(
        name=name,
        match=_match(t.get("match"), _key(path, "match")),
        versions=versions,
        stable=stable,
        weights=_weights(t.get("weights"), _key(path, "weights"), names, stable),
        sticky=_sticky(t.get("sticky"), _key(path, "sticky")),
        force=_force(t.get("force", []), _key(path, "force"), names),
        failover=_bool(t.get("failover", False), _key(path, "failover")),
        balance=_choice(
            t.get("balance", "least_request"),
            _key(path, "balance"),
            BALANCES,
        ),
        retries=_int(t.get("retries", 1), _key(path, "retries"), 0),
        outlier=_outlier(t.get("outlier"), _key(path, "outlier")),
        health_check=_health_check(t.get("health_check"), _key(path, "health_check")),
        rollout=_rollout(t.get("rollout"), _key(path, "rollout"), inherited),
    )


# --- entry points ------------------------------------------------------------------------------


def parse_config(
    data: object, env: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """Validate a loaded YAML tree into a Config; `env` (default os.environ) feeds ${VAR}."""
    if data is None:
        _fail("", "the config is empty; at least `routes` is required")
    tree = _table(data, "", _TOP_KEYS, ("routes",))
    tree = _table(_expand(tree, os.environ if env is None else env, ""), "", _TOP_KEYS)
    d = Config()
    route_items = _list(tree["routes"], "routes", "routes")
    if not route_items:
        _fail("routes", "must list at least one route")
    routes: list[RouteConfig] = []
    inherited = _global_source(tree.get("analysis"), "analysis")
    for i, item in enumerate(route_items):
        route = _route(item, f"routes[{i}]", inherited)
        for j, other in enumerate(routes):
            if other.name == route.name:
                _fail(
                    f"routes[{i}].name", f"duplicate route name (also routes[{j}].name)", route.name
                )
        routes.append(route)
    via = _token(tree.get("via", d.via), "via", "Via pseudonym")
    listen, listen_tls = _listen(tree["listen"], "listen") if "listen" in tree else (d.listen, None)
    return Config(
        listen=listen,
        listen_tls=listen_tls,
        admin=_admin(tree.get("admin"), "admin"),
        state=_state(tree.get("state"), "state"),
        timeouts=_timeouts(tree.get("timeouts"), "timeouts"),
        limits=_limits(tree.get("limits"), "limits"),
        trusted_proxies=_trusted_proxies(tree.get("trusted_proxies", []), "trusted_proxies"),
        forwarded_for=_choice(
            tree.get("forwarded_for", d.forwarded_for), "forwarded_for", FORWARDED_FOR
        ),
        version_header=_version_header(
            tree.get("version_header", d.version_header), "version_header"
        ),
        via=via,
        grace_period=parse_duration(tree.get("grace_period", d.grace_period), "grace_period"),
        workers=_workers(tree.get("workers", d.workers), "workers"),
        access_log=_bool(tree.get("access_log", d.access_log), "access_log"),
        notifications=_notifications(tree.get("notifications"), "notifications"),
        upgrades=_upgrades(tree.get("upgrades", list(d.upgrades)), "upgrades"),
        routes=tuple(routes),
        source=source,
    )


def _workers(value: object, path: str) -> int:
    """`auto`: one worker per CPU this process may run on (its affinity mask, as nginx's
    `worker_processes auto`), resolved here so `graygate check` shows the number."""
    if value == "auto":
        return max(1, min(256, len(os.sched_getaffinity(0))))
    if isinstance(value, str):
        _fail(path, "must be an integer 1..256 or auto", value)
    return _int(value, path, 1, 256)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[object, object]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: construct_mapping below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("", f"cannot read config file {path}: {reason}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = path
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{where}: invalid YAML: {problem}") from exc
    return parse_config(data, env, source=path)


# --- graygate check ------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _describe_step(step: Step) -> str:
    if isinstance(step, WeightStep):
        return f"{step.weight}%"
    return "pause" if step.seconds is None else f"pause {format_duration(step.seconds)}"


def describe(config: Config) -> str:
    """The resolved config as `graygate check` prints it."""
    token = "token set" if config.admin.token else "no token"
    tls = config.listen_tls
    https = f" (https, {tls.min_version}+, cert {tls.cert})" if tls is not None else ""
    lines = [
        f"listen {config.listen}{https}, admin {config.admin.listen} ({token})",
        f"state {config.state.backend} "
        + (config.state.path if config.state.backend == "file" else config.state.redis_url),
        f"timeouts connect {format_duration(config.timeouts.connect)}, "
        f"read {format_duration(config.timeouts.read)}, "
        f"request {format_duration(config.timeouts.request)}; workers {config.workers}",
    ]
    for n in config.notifications:
        where = urllib.parse.urlsplit(n.url)
        lines.append(
            f"notification {n.name}: {n.format} to {where.scheme}://{where.netloc.rpartition('@')[2]}"
            f" on {', '.join(n.events)} (timeout {format_duration(n.timeout)}, "
            f"{n.retries} retries)"
        )
    for r in config.routes:
        lines.append(f"route {r.name}: host {r.match.host} path_prefix {r.match.path_prefix}")
        for v in r.versions:
            role = " (stable)" if v.name == r.stable else ""
            urls = ", ".join(e.url for e in v.endpoints)
            lines.append(f"  version {v.name}{role}: {urls}")
        lines.append("  weights " + " ".join(f"{n}={w}" for n, w in r.weights))
        if r.sticky is None:
            lines.append("  sticky: off (weighted choice per request)")
        else:
            c = r.sticky.cookie
            keys = [f"{k.kind}:{k.name}" for k in r.sticky.keys]
            keys.append(f"own cookie {c.name} (max_age {format_duration(c.max_age)})")
            lines.append("  sticky: " + ", then ".join(keys))
        for f in r.force:
            test = f"= {f.value!r}" if f.regex is None else f"~ /{f.regex}/"
            lines.append(f"  force: {f.kind} {f.name} {test} -> {f.to}")
        ro = r.rollout
        steps = ", ".join(_describe_step(s) for s in ro.steps)
        lines.append(
            f"  rollout: steps {steps} every {format_duration(ro.interval)}; "
            f"min_samples {ro.analysis.min_samples}, on_failure {ro.on_failure}"
        )
        for gate in GATE_NAMES:
            g = ro.gates.get(gate)
            if g is not None:
                host = urllib.parse.urlsplit(g.url).netloc.rpartition("@")[2]
                lines.append(f"  gate {gate}: {host} (timeout {format_duration(g.timeout)})")
        if ro.analysis.prometheus is not None and ro.analysis.source == "prometheus":
            lines.append(f"  analysis source: prometheus {ro.analysis.prometheus.url}")
    return "\n".join(lines)
