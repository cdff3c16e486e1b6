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

from proxy.core.config.model import Reason
from proxy.core.hosts import host_name, matches
from proxy.core.state import RoutePolicy, RoutingPolicy

BUCKETS = 10000  # a canary weight w (percent) owns buckets [0, w * 100)

# graygate's own cohort id as accepted back from a client: an RFC 7230 token of at most
# 128 characters. Anything else is ignored and a fresh id is minted, so a client cannot
# make us hash (or echo) an arbitrary blob.
COHORT_VALUE_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")


@dataclass(frozen=True, slots=True)
class Choice:
    version: str
    reason: Reason
    new_cookie: str | None = None  # freshly minted cohort id; the exchange sets the cookie


_CHOICES: dict[tuple[str, Reason], Choice] = {}


def _choice(version: str, reason: Reason) -> Choice:
    # Choices without a new cookie are immutable and few: build each once, not per request.
    key = (version, reason)
    found = _CHOICES.get(key)
    if found is None:
        found = Choice(version, reason)
        if len(_CHOICES) < 1024:
            _CHOICES[key] = found
    return found


def valid_cohort_value(value: str) -> bool:
    return COHORT_VALUE_RE.fullmatch(value) is not None


def bucket(salt: bytes, key: str) -> int:
    """The cohort bucket of `key` in 0..9999, the same in every process and on every machine.

    blake2b-64 over `salt + b"\\x1f" + utf-8(key)`, read big endian, mod 10000.
    """
    digest = hashlib.blake2b(
        salt + b"\x1f" + key.encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def match_route(policy: RoutingPolicy, host: str, path: str) -> RoutePolicy | None:
    """First route in config order whose host and path prefix match.

    `host` is the raw Host header value ("Shop.Example.com:8080", "[::1]:8080");
    `*.example.com` matches every subdomain but not example.com itself; the path prefix
    is a plain string prefix of the path without its query, as in nginx and Envoy.
    """
    routes = policy.routes
    if not routes:
        return None
    name: str | None = None  # the Host is normalised only if a route looks at it
    end = path.find("?")
    if end < 0:
        end = len(path)
    for route in routes:
        exact = route.host_exact
        suffix = route.host_suffix
        if exact is not None or suffix is not None:
            if name is None:
                name = host_name(host)
            if not matches(name, exact, suffix):
                continue
        if path.startswith(route.path_prefix, 0, end):
            return route
    return None


def choose(
    route: RoutePolicy,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
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

    sticky = route.config.sticky
    if sticky is not None:
        key: str | None = None
        for source in sticky.keys:
            key = (headers if source.kind == "header" else cookies).get(source.name)
            if key:
                break
        new_cookie: str | None = None
        if not key:
            key = cookies.get(sticky.cookie.name)
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
        else:
            version = route.stable
        if new_cookie is None:
            return _choice(version, "cohort")
        return Choice(version, "cohort", new_cookie)

    point = roll * 100.0
    cumulative = route.cumulative
    for version, upper in cumulative:
        if point < upper:
            return _choice(version, "weight")
    # Only reachable through float rounding at roll ~ 1.0: the last positive-weight version.
    return _choice(cumulative[-1][0], "weight")


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
