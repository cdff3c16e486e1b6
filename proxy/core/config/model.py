"""The configuration model: frozen dataclasses and Literals, ConfigError and NO_VALUE.

Durations are float seconds, sizes int bytes. No parsing here: values, sections, routes
and rollout build these; load.parse_config is the entry point.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

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
ROLES: tuple[Role, ...] = ("canary", "stable")


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


@dataclass(frozen=True)
class MirrorStep:
    """Shadow traffic before any weight step: `percent` of the route's requests are copied
    to the canary for `seconds`; passes when the mismatch ratio stays under the limit."""

    seconds: float
    percent: float = 10.0  # 0..100, 0.01 steps
    max_mismatch_ratio: float = 0.01
    min_samples: int = 200


Step = WeightStep | PauseStep | MirrorStep


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


CompareBody = Literal["none", "digest", "json"]
COMPARE_BODIES: tuple[CompareBody, ...] = ("none", "digest", "json")
# Header values never stored in the mismatch evidence, whatever the config says.
MIRROR_DENY_HEADERS: tuple[str, ...] = ("authorization", "cookie", "set-cookie")


@dataclass(frozen=True)
class CompareConfig:
    status: bool = True
    headers: tuple[str, ...] = ("content-type",)  # lowercase names compared by value
    body: CompareBody = "digest"
    ignore_json_paths: tuple[str, ...] = ()  # "$.a.b", "$.items[*].id"
    ignore_headers: tuple[str, ...] = ()  # lowercase; never compared
    max_json_bytes: int = 1048576  # larger JSON bodies are compared by digest


@dataclass(frozen=True)
class MirrorConfig:
    """Shadow copies of a route's requests (the user's answer never waits for them)."""

    to: str = "canary"  # "canary" (the rollout's canary) or a version name
    percent: float = 0.0  # of eligible requests outside a mirror step; 0..100
    methods: tuple[str, ...] = ("GET", "HEAD")  # uppercase
    max_body_bytes: int = 0  # requests with a larger body are not mirrored (counted)
    max_inflight: int = 64  # shadow requests in flight per route; beyond: dropped, counted
    host_suffix: str | None = None  # "-shadow": Host "shop" goes out as "shop-shadow"
    forced: bool = False  # also mirror forced (tester) requests
    timeout: float = 10.0  # a shadow answer slower than this is a shadow_error
    noise: Literal["stable"] | None = None  # also copy to stable: Diffy-style noise floor
    compare: CompareConfig = field(default_factory=CompareConfig)


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
    mirror: MirrorConfig | None = None

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
