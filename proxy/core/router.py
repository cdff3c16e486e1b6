"""Routing decisions for one request: which route (host, path prefix) and which version
(force rule > cohort bucket > weighted draw), with the reason. Pure and per request:
standard library only, no I/O, no randomness of its own (the caller passes `roll` and
`mint`), and no allocation beyond the returned Choice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from proxy.core.config.model import Reason
from proxy.core.hosts import host_name, matches
from proxy.core.state import CompiledForce, RoutePolicy, RoutingPolicy

BUCKETS: Final = 10000  # a canary weight w (percent) owns buckets [0, w * 100)

# graygate's own cohort id as accepted back from a client: an RFC 7230 token of at most
# 128 characters. Anything else is ignored and a fresh id is minted, so a client cannot
# make us hash (or echo) an arbitrary blob.
COHORT_VALUE_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
# Bucket cache bounds: keys are client-controlled (a header or cookie value), so only
# short ones are kept, and at most CACHE_ENTRIES of them (all dropped when full).
CACHE_KEY_CHARS: Final = 128
CACHE_ENTRIES: Final = 8192


@dataclass(frozen=True, slots=True)
class Choice:
    version: str
    reason: Reason
    new_cookie: str | None = None  # freshly minted cohort id; the exchange sets the cookie


_CHOICES: Final[dict[tuple[str, Reason], Choice]] = {}


def _choice(version: str, reason: Reason) -> Choice:
    # Choices without a new cookie are immutable and few: build each once, not per request.
    key = (version, reason)
    found = _CHOICES.get(key)
    if found is None:
        found = Choice(version, reason)
        if len(_CHOICES) < 1024:
            _CHOICES[key] = found
    return found


_VALID: Final[dict[str, bool]] = {}


def valid_cohort_value(value: str) -> bool:
    """COHORT_VALUE_RE matches all of it; the verdicts are remembered (bounded: at most
    CACHE_ENTRIES values of at most 128 characters, all dropped when full)."""
    if len(value) > 128:
        return False
    found = _VALID.get(value)
    if found is None:
        found = COHORT_VALUE_RE.fullmatch(value) is not None
        if len(_VALID) >= CACHE_ENTRIES:
            _VALID.clear()
        _VALID[value] = found
    return found


def bucket_of(salt: bytes, key: str) -> int:
    """The cohort bucket of `key` in 0..9999, the same in every process and on every machine.

    blake2b-64 over `salt + b"\\x1f" + utf-8(key)`, read big endian, mod 10000.
    """
    digest = hashlib.blake2b(
        salt + b"\x1f" + key.encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class BucketCache:
    """bucket_of per (salt, key), remembered: a returning user's bucket is one dict lookup
    instead of a hash (7k instructions). Bounded: keys longer than CACHE_KEY_CHARS are not
    kept, and the whole cache is dropped once it holds CACHE_ENTRIES keys."""

    __slots__ = ("by_salt", "size")

    def __init__(self) -> None:
        self.by_salt: dict[bytes, dict[str, int]] = {}
        self.size = 0

    def get(self, salt: bytes, key: str) -> int:
        by_key = self.by_salt.get(salt)
        if by_key is not None:
            found = by_key.get(key)
            if found is not None:
                return found
        value = bucket_of(salt, key)
        if len(key) <= CACHE_KEY_CHARS:
            if self.size >= CACHE_ENTRIES:
                self.by_salt = {}
                self.size = 0
                by_key = None
            if by_key is None:
                by_key = self.by_salt[salt] = {}
            by_key[key] = value
            self.size += 1
        return value


_BUCKET_CACHE: Final = BucketCache()


def bucket(salt: bytes, key: str) -> int:
    """bucket_of(salt, key), from the process's bounded cache."""
    return _BUCKET_CACHE.get(salt, key)


class RouteView:
    """The fields of a RoutePolicy that routing reads per request, in a class of the
    compiled router: RoutePolicy stays interpreted (core/state.py), and each attribute read
    of it from compiled code costs a type-dict walk. Built once per policy snapshot."""

    __slots__ = (
        "canary",
        "canary_cohort",
        "cookie_name",
        "cumulative",
        "force",
        "host_exact",
        "host_suffix",
        "name",
        "needs_cookies",
        "path_prefix",
        "policy",
        "salt",
        "stable",
        "stable_cohort",
        "sticky",
        "sticky_keys",
        "threshold",
        "weighted",
    )

    def __init__(self, policy: RoutePolicy) -> None:
        self.policy = policy
        self.name: str = policy.name
        self.stable: str = policy.stable
        self.canary: str | None = policy.canary
        self.threshold: int = policy.threshold
        self.salt: bytes = policy.salt
        self.force: tuple[CompiledForce, ...] = policy.force
        self.needs_cookies: bool = policy.needs_cookies
        self.cumulative: tuple[tuple[str, int], ...] = policy.cumulative
        self.host_exact: str | None = policy.host_exact
        self.host_suffix: str | None = policy.host_suffix
        self.path_prefix: str = policy.path_prefix
        sticky = policy.config.sticky
        self.sticky = sticky is not None
        # (from a header, name): the cohort key sources in order
        self.sticky_keys: tuple[tuple[bool, str], ...] = (
            tuple((s.kind == "header", s.name) for s in sticky.keys) if sticky is not None else ()
        )
        self.cookie_name: str = sticky.cookie.name if sticky is not None else ""
        # The answers without a new cookie, built once (they are immutable).
        self.stable_cohort: Choice = _choice(policy.stable, "cohort")
        self.canary_cohort: Choice | None = (
            _choice(policy.canary, "cohort") if policy.canary is not None else None
        )
        self.weighted: tuple[tuple[Choice, int], ...] = tuple(
            (_choice(v, "weight"), upper) for v, upper in policy.cumulative
        )


def views(policy: RoutingPolicy) -> tuple[RouteView, ...]:
    """The routes of a snapshot as RouteViews, in config order (match() reads these)."""
    return tuple(RouteView(r) for r in policy.routes)


def match_route(policy: RoutingPolicy, host: str, path: str) -> RoutePolicy | None:
    """First route in config order whose host and path prefix match.

    `host` is the raw Host header value ("Shop.Example.com:8080", "[::1]:8080");
    `*.example.com` matches every subdomain but not example.com itself; the path prefix
    is a plain string prefix of the path without its query, as in nginx and Envoy.
    """
    found = match(views(policy), host, path)
    return found.policy if found is not None else None


def match(routes: tuple[RouteView, ...], host: str, path: str) -> RouteView | None:
    """match_route on the views of a snapshot: what the data plane calls."""
    if not routes:
        return None
    name: str | None = None  # the Host is normalised only if a route looks at it
    end = path.find("?")
    if end >= 0:
        path = path[:end]  # the data plane's paths have no query: no copy for them
    for route in routes:
        exact = route.host_exact
        suffix = route.host_suffix
        if exact is not None or suffix is not None:
            if name is None:
                name = host_name(host)
            if not matches(name, exact, suffix):
                continue
        if path.startswith(route.path_prefix):  # one argument: native code when compiled
            return route
    return None


def choose(
    route: RoutePolicy,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    roll: float,
    mint: Callable[[], str],
) -> Choice:
    """pick() for a RoutePolicy (the data plane calls pick with the snapshot's views)."""
    return pick(RouteView(route), dict(headers), dict(cookies), roll, mint)


def pick(
    route: RouteView,
    headers: dict[str, str],
    cookies: dict[str, str],
    roll: float,
    mint: Callable[[], str],
) -> Choice:
    """Pick the version for one request: force rule > cohort bucket > weighted draw.

    `headers` has lowercase names; `cookies` may be empty unless `route.needs_cookies`;
    `roll` is uniform in [0, 1); `mint` makes a new cohort id when the client has none.

    Example, blue stable and green the canary at 10 %, sticky on header X-User-Id,
    force rule `X-Canary: always -> canary`:

        {"x-canary": "always"}  -> Choice("green", "force_header")      (even at 0 %)
        {"x-user-id": "42"}     -> Choice("blue", "cohort")  if bucket(salt, "42") >= 1000
        {} and no gg_uid cookie -> Choice(..., "cohort", new_cookie=mint())
    """
    for rule in route.force:
        value = (headers if rule.kind == "header" else cookies).get(rule.name)
        if value is None:
            continue
        if rule.pattern is None:
            if value == rule.value:
                return _choice(rule.version, rule.reason)
        elif rule.pattern.fullmatch(value) is not None:
            return _choice(rule.version, rule.reason)

    if route.sticky:
        key: str | None = None
        for from_header, name in route.sticky_keys:
            key = (headers if from_header else cookies).get(name)
            if key:
                break
        new_cookie: str | None = None
        if not key:
            key = cookies.get(route.cookie_name)
            if not key or not valid_cohort_value(key):
                key = new_cookie = mint()
        canary = route.canary
        threshold = route.threshold
        # Weight 0 and 100 are exact and skip the hash; between them the bucket decides.
        if (
            canary is not None
            and threshold > 0
            and (threshold >= BUCKETS or bucket(route.salt, key) < threshold)
        ):
            version = canary
            found = route.canary_cohort
        else:
            version = route.stable
            found = route.stable_cohort
        if new_cookie is None and found is not None:
            return found
        return Choice(version, "cohort", new_cookie)

    point = roll * 100.0
    weighted = route.weighted
    for choice, upper in weighted:
        if point < upper:
            return choice
    # Only reachable through float rounding at roll ~ 1.0: the last positive-weight version.
    return weighted[-1][0]


_COOKIES: Final[dict[str, dict[str, str]]] = {}
COOKIE_CACHE_CHARS: Final = 1024
COOKIE_CACHE_ENTRIES: Final = 1024


def cookies_of(header_value: str) -> dict[str, str]:
    """parse_cookies, remembered per header value (a keep-alive client repeats its Cookie
    header): the dict returned is shared, read it only. Bounded: values up to
    COOKIE_CACHE_CHARS, at most COOKIE_CACHE_ENTRIES of them, all dropped when full."""
    found = _COOKIES.get(header_value)
    if found is None:
        found = parse_cookies(header_value)
        if len(header_value) <= COOKIE_CACHE_CHARS:
            if len(_COOKIES) >= COOKIE_CACHE_ENTRIES:
                _COOKIES.clear()
            _COOKIES[header_value] = found
    return found


def parse_cookies(header_value: str) -> dict[str, str]:
    """`Cookie` header -> {name: value}; first occurrence wins, junk pairs are skipped."""
    cookies: dict[str, str] = {}
    for part in header_value.split(";"):
        eq = part.find("=")
        if eq <= 0:
            continue
        name = part[:eq].strip()
        if not name or name in cookies:
            continue
        value = part[eq + 1 :].strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        cookies[name] = value
    return cookies
