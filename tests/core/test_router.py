"""router.py: route matching, the version choice and its guarantees, cookie parsing."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.config.model import (
    CohortSource,
    Config,
    CookieConfig,
    ForceRule,
    RouteConfig,
    StickyConfig,
)
from proxy.core.router import (
    BUCKETS,
    CACHE_ENTRIES,
    CACHE_KEY_CHARS,
    COHORT_VALUE_RE,
    BucketCache,
    Choice,
    bucket,
    bucket_of,
    choose,
    cookies_of,
    match_route,
    parse_cookies,
    valid_cohort_value,
)
from proxy.core.state import RolloutStatus, RoutePolicy, RouteState, compile_policy
from tests.helpers import ROOT, route_model


def compiled(rc: RouteConfig, state: RouteState | None = None) -> RoutePolicy:
    states = {rc.name: state} if state is not None else {}
    return compile_policy(Config(routes=(rc,)), states).routes[0]


def with_canary_weight(rc: RouteConfig, w: int, **state_kw: object) -> RoutePolicy:
    state = RouteState(weights=(("blue", 100 - w), ("green", w)), stable="blue", **state_kw)
    return compiled(rc, state)


STICKY = StickyConfig(keys=(CohortSource("header", "x-user-id"), CohortSource("cookie", "session")))
FORCE = (
    ForceRule("header", "x-canary", "always", None, "canary"),
    ForceRule("header", "x-canary", "never", None, "stable"),
    ForceRule("cookie", "canary", None, r"yes|always", "canary"),
    ForceRule("header", "x-version", "green", None, "green"),
)


def no_mint() -> str:
    raise AssertionError("mint() must not be called when a cohort key is present")


def counting_mint():
    calls: list[str] = []

    def mint() -> str:
        value = f"minted{len(calls)}"
        calls.append(value)
        return value

    return mint, calls


def binomial_ok(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    if p in (0.0, 1.0):
        return hits == n * p
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# --- bucket -------------------------------------------------------------------------------


@given(st.binary(max_size=40), st.text(max_size=60))
def test_bucket_is_in_range_and_deterministic(salt, key):
    b = bucket(salt, key)
    assert 0 <= b < BUCKETS
    assert bucket(salt, key) == b


def test_bucket_is_the_same_in_a_fresh_process():
    rng = random.Random(7)
    keys = [f"user-{rng.getrandbits(40)}" for _ in range(200)] + ["", "ü-ñ", "x" * 500]
    salts = [b"shop", b"", "säure".encode()]
    here = [[bucket(s, k) for k in keys] for s in salts]
    code = (
        "import json, sys; from proxy.core.router import bucket; "
        "keys, salts = json.load(sys.stdin); "
        "print(json.dumps([[bucket(s.encode('latin-1'), k) for k in keys] for s in salts]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str hash() than ours
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([keys, [s.decode("latin-1") for s in salts]]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout) == here


def test_bucket_cache_is_exact_and_bounded():
    cache = BucketCache()
    keys = [f"user-{i}" for i in range(CACHE_ENTRIES + 10)]
    for salt in (b"a", b"b"):
        assert [cache.get(salt, k) for k in keys[:50]] == [bucket_of(salt, k) for k in keys[:50]]
        assert [cache.get(salt, k) for k in keys[:50]] == [bucket_of(salt, k) for k in keys[:50]]
    assert cache.size == 100
    for k in keys:  # a client sending ever new keys: the cache is dropped, never grows past
        assert cache.get(b"a", k) == bucket_of(b"a", k)
        assert cache.size <= CACHE_ENTRIES
    long_key = "x" * (CACHE_KEY_CHARS + 1)
    size = cache.size
    assert cache.get(b"a", long_key) == bucket_of(b"a", long_key)
    assert cache.size == size  # not kept
    assert bucket(b"a", long_key) == bucket_of(b"a", long_key)


def test_bucket_depends_on_salt():
    keys = [f"k{i}" for i in range(500)]
    same = sum(bucket(b"a", k) == bucket(b"b", k) for k in keys)
    assert same < 10  # ~0.05 expected by chance


def test_buckets_are_uniform():
    rng = random.Random(11)
    n = 40000
    counts = [0] * 10
    for _ in range(n):
        counts[bucket(b"shop", str(rng.getrandbits(64))) // 1000] += 1
    for c in counts:
        assert binomial_ok(c, n, 0.1)


# --- weighted draw (no stickiness) -------------------------------------------------------------


@settings(max_examples=25, derandomize=True, deadline=None)
@given(st.integers(0, 100), st.integers(0, 2**32))
def test_weighted_share_follows_weights(w, seed):
    route = with_canary_weight(route_model(), w)
    rng = random.Random(seed)
    n = 4000
    hits = 0
    for _ in range(n):
        choice = choose(route, {}, {}, rng.random(), no_mint)
        assert choice.reason == "weight"
        assert choice.new_cookie is None
        hits += choice.version == "green"
    assert binomial_ok(hits, n, w / 100)


EDGE_ROLLS = [0.0, 1e-300, 0.0099999, 0.01, 0.5, 0.99, math.nextafter(1.0, 0.0)]


@pytest.mark.parametrize("roll", EDGE_ROLLS)
def test_weight_zero_and_hundred_are_exact_for_draws(roll):
    assert choose(with_canary_weight(route_model(), 0), {}, {}, roll, no_mint).version == "blue"
    assert choose(with_canary_weight(route_model(), 100), {}, {}, roll, no_mint).version == "green"


@given(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 100))
def test_draw_boundary_is_at_the_weight(roll, w):
    route = with_canary_weight(route_model(), w)
    version = choose(route, {}, {}, roll, no_mint).version
    # blue comes first in version order: it owns rolls [0, (100 - w) / 100)
    assert version == ("blue" if roll * 100 < 100 - w else "green")


@pytest.mark.parametrize(("w", "roll"), [(50, 0.5), (75, 0.25), (25, 0.75), (99, 0.01)])
def test_draw_boundary_roll_goes_to_the_upper_interval(w, roll):
    # rolls are [0, 1): blue owns [0, (100 - w) / 100), so the boundary roll is green's
    assert roll * 100 == 100 - w
    route = with_canary_weight(route_model(), w)
    assert choose(route, {}, {}, roll, no_mint).version == "green"
    assert choose(route, {}, {}, math.nextafter(roll, 0.0), no_mint).version == "blue"


def test_single_version_route_always_picks_it():
    rc = route_model(versions=("blue",), weights=(100,))
    route = compiled(rc)
    assert route.canary is None
    for roll in EDGE_ROLLS:
        assert choose(route, {}, {}, roll, no_mint) == Choice("blue", "weight")


# --- cohort stickiness --------------------------------------------------------------------


@settings(max_examples=20, derandomize=True, deadline=None)
@given(st.integers(0, 100), st.integers(0, 2**32))
def test_cohort_share_follows_weight(w, seed):
    route = with_canary_weight(route_model(sticky=STICKY), w)
    rng = random.Random(seed)
    n = 4000
    hits = 0
    for _ in range(n):
        choice = choose(route, {"x-user-id": str(rng.getrandbits(64))}, {}, 0.0, no_mint)
        assert choice.reason == "cohort"
        hits += choice.version == "green"
    assert binomial_ok(hits, n, w / 100)


@given(st.text(min_size=1, max_size=40), st.integers(0, 100), st.integers(0, 100))
def test_moving_the_weight_moves_users_one_way_only(key, w1, w2):
    low, high = sorted((w1, w2))
    rc = route_model(sticky=STICKY)
    at_low = choose(with_canary_weight(rc, low), {"x-user-id": key}, {}, 0.5, no_mint).version
    at_high = choose(with_canary_weight(rc, high), {"x-user-id": key}, {}, 0.5, no_mint).version
    # Raising never moves canary -> stable; lowering never moves stable -> canary.
    assert not (at_low == "green" and at_high == "blue")


@given(st.text(min_size=1, max_size=40), st.floats(0.0, 1.0, exclude_max=True))
def test_cohort_choice_ignores_roll_and_is_stable(key, roll):
    route = with_canary_weight(route_model(sticky=STICKY), 37)
    a = choose(route, {"x-user-id": key}, {}, roll, no_mint)
    b = choose(route, {"x-user-id": key}, {}, 0.0, no_mint)
    assert a == b
    assert a.version == ("green" if bucket(b"shop", key) < 3700 else "blue")


def test_cohort_weight_zero_and_hundred_are_exact():
    rc = route_model(sticky=STICKY)
    keys = [str(i) for i in range(3000)]
    assert {
        choose(with_canary_weight(rc, 0), {"x-user-id": k}, {}, 0.9, no_mint).version for k in keys
    } == {"blue"}
    assert {
        choose(with_canary_weight(rc, 100), {"x-user-id": k}, {}, 0.1, no_mint).version
        for k in keys
    } == {"green"}


def test_rollback_and_rerollout_expose_the_same_users_first():
    rc = route_model(sticky=STICKY)
    keys = [f"u{i}" for i in range(2000)]

    def canary_users(w):
        route = with_canary_weight(rc, w)
        return {
            k for k in keys if choose(route, {"x-user-id": k}, {}, 0.0, no_mint).version == "green"
        }

    first = canary_users(10)
    assert canary_users(0) == set()
    assert canary_users(10) == first
    assert first <= canary_users(25)


def test_cohort_key_sources_in_order():
    route = with_canary_weight(route_model(sticky=STICKY), 50)
    salt = route.salt

    def expected(key):
        return "green" if bucket(salt, key) < 5000 else "blue"

    # header source first, even when the cookie source and gg_uid are present
    c = choose(route, {"x-user-id": "alice"}, {"session": "s1", "gg_uid": "g1"}, 0.0, no_mint)
    assert c == Choice(expected("alice"), "cohort")
    # then the cookie source
    c = choose(route, {}, {"session": "s1", "gg_uid": "g1"}, 0.0, no_mint)
    assert c == Choice(expected("s1"), "cohort")
    # an empty header value counts as absent
    c = choose(route, {"x-user-id": ""}, {"session": "s1"}, 0.0, no_mint)
    assert c == Choice(expected("s1"), "cohort")
    # then graygate's own cookie, not re-issued
    c = choose(route, {}, {"gg_uid": "g1"}, 0.0, no_mint)
    assert c == Choice(expected("g1"), "cohort")
    # then a freshly minted id, hashed and returned for Set-Cookie
    mint, calls = counting_mint()
    c = choose(route, {}, {}, 0.0, mint)
    assert calls == ["minted0"]
    assert c == Choice(expected("minted0"), "cohort", "minted0")


def test_cookie_name_is_configurable():
    sticky = StickyConfig(cookie=CookieConfig(name="cohort"))
    route = with_canary_weight(route_model(sticky=sticky), 50)
    assert route.needs_cookies
    c = choose(route, {}, {"cohort": "abc", "gg_uid": "zzz"}, 0.0, no_mint)
    assert c.new_cookie is None
    assert c.version == ("green" if bucket(route.salt, "abc") < 5000 else "blue")


@pytest.mark.parametrize(
    "bad", ["x" * 129, "a b", "a;b", 'quo"te', "ü", "a,b", "tab\tx", "\x00", "a=b"]
)
def test_bad_client_cohort_cookie_is_replaced(bad):
    route = with_canary_weight(route_model(sticky=StickyConfig()), 50)
    mint, calls = counting_mint()
    c = choose(route, {}, {"gg_uid": bad}, 0.0, mint)
    assert calls == ["minted0"]
    assert c.new_cookie == "minted0"


@given(st.text(alphabet="abcXYZ019-_.~!", min_size=1, max_size=128))
def test_good_client_cohort_cookie_is_kept(value):
    assert valid_cohort_value(value)
    route = with_canary_weight(route_model(sticky=StickyConfig()), 50)
    c = choose(route, {}, {"gg_uid": value}, 0.0, no_mint)
    assert c.new_cookie is None


def test_cohort_value_limits():
    assert COHORT_VALUE_RE.fullmatch("a" * 128)
    assert not valid_cohort_value("a" * 129)
    assert not valid_cohort_value("")


def test_minted_cookie_is_issued_even_without_a_canary():
    rc = route_model(versions=("blue",), weights=(100,), sticky=StickyConfig())
    mint, _calls = counting_mint()
    assert choose(compiled(rc), {}, {}, 0.3, mint) == Choice("blue", "cohort", "minted0")


def test_sticky_salt_overrides_route_name():
    route = with_canary_weight(route_model(sticky=StickyConfig(keys=STICKY.keys, salt="s2")), 50)
    assert route.salt == b"s2"
    keys = [str(i) for i in range(300)]
    got = [choose(route, {"x-user-id": k}, {}, 0.0, no_mint).version for k in keys]
    assert got == ["green" if bucket(b"s2", k) < 5000 else "blue" for k in keys]


def test_rollout_canary_role_is_used_for_cohorts():
    # green is stable; blue is the canary of a running rollout at 30 %
    rc = route_model(sticky=STICKY, stable="green")
    state = RouteState(
        weights=(("blue", 30), ("green", 70)),
        stable="green",
        rollout=RolloutStatus(phase="progressing", canary="blue"),
    )
    route = compiled(rc, state)
    assert (route.canary, route.threshold) == ("blue", 3000)
    for k in map(str, range(200)):
        want = "blue" if bucket(route.salt, k) < 3000 else "green"
        assert choose(route, {"x-user-id": k}, {}, 0.0, no_mint).version == want


# --- force rules ------------------------------------------------------------------------


@pytest.mark.parametrize("sticky", [None, STICKY])
@pytest.mark.parametrize("w", [0, 40, 100])
def test_force_rules_win_over_any_weight(sticky, w):
    route = with_canary_weight(route_model(sticky=sticky, force=FORCE), w)
    for roll in EDGE_ROLLS:
        facts = {"x-user-id": "u1"}
        assert choose(route, {"x-canary": "always", **facts}, {}, roll, no_mint) == Choice(
            "green", "force_header"
        )
        assert choose(route, {"x-canary": "never", **facts}, {}, roll, no_mint) == Choice(
            "blue", "force_header"
        )
        assert choose(route, facts, {"canary": "yes"}, roll, no_mint) == Choice(
            "green", "force_cookie"
        )
        assert choose(route, {"x-version": "green"}, {}, roll, no_mint) == Choice(
            "green", "force_header"
        )


@given(
    st.integers(0, 100),
    st.floats(0.0, 1.0, exclude_max=True),
    st.text(max_size=20),
)
def test_force_header_always_wins_property(w, roll, user):
    route = with_canary_weight(route_model(sticky=STICKY, force=FORCE), w)
    c = choose(route, {"x-canary": "always", "x-user-id": user}, {"session": user}, roll, no_mint)
    assert c == Choice("green", "force_header")


def test_force_rules_apply_in_order():
    force = (
        ForceRule("header", "x-a", "1", None, "stable"),
        ForceRule("header", "x-b", "1", None, "canary"),
    )
    route = with_canary_weight(route_model(force=force), 50)
    assert choose(route, {"x-a": "1", "x-b": "1"}, {}, 0.99, no_mint).version == "blue"
    assert choose(route, {"x-b": "1"}, {}, 0.0, no_mint).version == "green"


def test_force_regex_is_a_full_match_and_values_are_exact():
    route = with_canary_weight(route_model(force=FORCE), 0)
    for value in ["yes!", "ayes", "YES", "alwaysx", ""]:
        assert choose(route, {}, {"canary": value}, 0.0, no_mint) == Choice("blue", "weight")
    for value in ["Always", "always ", "nope"]:
        assert choose(route, {"x-canary": value}, {}, 0.0, no_mint) == Choice("blue", "weight")
    # a cookie rule does not read headers, and a header rule does not read cookies
    assert choose(route, {"canary": "yes"}, {"x-canary": "always"}, 0.0, no_mint).reason == "weight"


def test_force_to_canary_without_a_canary_goes_to_stable():
    rc = route_model(versions=("blue",), weights=(100,), force=FORCE[:1])
    route = compiled(rc)
    assert choose(route, {"x-canary": "always"}, {}, 0.5, no_mint) == Choice("blue", "force_header")


def test_force_to_canary_follows_the_rollout_canary():
    rc = route_model(force=FORCE[:2], stable="green", weights=(0, 100))
    state = RouteState(
        weights=(("blue", 0), ("green", 100)),
        stable="green",
        rollout=RolloutStatus(phase="paused", canary="blue"),
    )
    route = compiled(rc, state)
    assert choose(route, {"x-canary": "always"}, {}, 0.5, no_mint) == Choice("blue", "force_header")
    assert choose(route, {"x-canary": "never"}, {}, 0.5, no_mint) == Choice("green", "force_header")


# --- match_route --------------------------------------------------------------------------


def routing(*routes: RouteConfig):
    return compile_policy(Config(routes=routes), {})


def test_match_route_first_match_in_config_order_wins():
    policy = routing(
        route_model("api", prefix="/api"),
        route_model("api-v2", prefix="/api/v2"),  # shadowed by "api": config order wins
        route_model("all"),
    )
    assert match_route(policy, "x", "/api/v2/items").name == "api"
    assert match_route(policy, "x", "/apix").name == "api"  # plain prefix, as nginx/Envoy
    assert match_route(policy, "x", "/").name == "all"
    assert match_route(policy, "x", "/other?q=/api").name == "all"


def test_match_route_path_prefix_ignores_query():
    policy = routing(route_model("long", prefix="/search/all"), route_model("all"))
    assert match_route(policy, "h", "/search?x=/all").name == "all"
    assert match_route(policy, "h", "/search/all?x=1").name == "long"
    assert match_route(policy, "h", "/search/all").name == "long"
    # only a prefix that itself holds "?" can tell the query apart from the path
    odd = routing(route_model("odd", prefix="/search?"))
    assert match_route(odd, "h", "/search?x=1") is None
    assert match_route(odd, "h", "/search") is None


def test_match_route_hosts():
    policy = routing(
        route_model("exact", host="shop.example.com"),
        route_model("wild", host="*.example.com"),
        route_model("v6", host="[::1]"),
        route_model("ip", host="127.0.0.1", prefix="/ip"),
    )
    assert match_route(policy, "shop.example.com", "/").name == "exact"
    assert match_route(policy, "SHOP.Example.COM:8080", "/").name == "exact"
    assert match_route(policy, "shop.example.com.", "/").name == "exact"
    assert match_route(policy, "a.example.com", "/").name == "wild"
    assert match_route(policy, "a.b.example.com:443", "/").name == "wild"
    assert match_route(policy, "example.com", "/") is None  # wildcard excludes the bare domain
    assert match_route(policy, "badexample.com", "/") is None
    assert match_route(policy, ".example.com", "/") is None
    assert match_route(policy, "[::1]:8080", "/").name == "v6"
    assert match_route(policy, "[::1]", "/").name == "v6"
    assert match_route(policy, "127.0.0.1:8080", "/ip/x").name == "ip"
    assert match_route(policy, "127.0.0.1:8080", "/") is None
    assert match_route(policy, "", "/") is None


def test_match_route_star_matches_every_host():
    policy = routing(route_model("only", host="example.org"), route_model("any", host="*"))
    for host in ["", "x", "EXAMPLE.ORG.evil", "[::1]:1", "10.0.0.1:80"]:
        assert match_route(policy, host, "/p").name == "any"
    assert match_route(policy, "Example.Org:80", "/p").name == "only"


def test_match_route_empty_policy():
    assert match_route(routing(), "x", "/") is None


@given(
    st.sampled_from(["shop.example.com", "a.example.com", "example.com", "other.net"]),
    st.sampled_from(["", ":80", ":8080"]),
    st.booleans(),
    st.sampled_from(["/", "/api", "/api/x", "/ap", "/api?x=1"]),
)
def test_match_route_agrees_with_a_plain_model(name, port, upper, path):
    configs = [
        route_model("r0", host="shop.example.com", prefix="/api"),
        route_model("r1", host="*.example.com", prefix="/"),
        route_model("r2", host="example.com", prefix="/api"),
        route_model("r3", host="*", prefix="/api/"),
    ]
    policy = routing(*configs)
    host = (name.upper() if upper else name) + port
    bare = path.split("?", 1)[0]

    def model_matches(rc):
        h = rc.match.host
        host_ok = h == "*" or (
            name.endswith(h[1:]) and name != h[2:] if h.startswith("*.") else name == h
        )
        return host_ok and bare.startswith(rc.match.path_prefix)

    want = next((rc.name for rc in configs if model_matches(rc)), None)
    got = match_route(policy, host, path)
    assert (got.name if got else None) == want


# --- parse_cookies ------------------------------------------------------------------------


def test_parse_cookies_basics():
    assert parse_cookies("a=1; b=2") == {"a": "1", "b": "2"}
    assert parse_cookies("a=1;b=2;  c = 3 ") == {"a": "1", "b": "2", "c": "3"}
    assert parse_cookies('a="quoted value"; b=""') == {"a": "quoted value", "b": ""}
    assert parse_cookies("a=1; a=2") == {"a": "1"}  # first occurrence wins
    assert parse_cookies("junk; =nope; ;; b=2; c") == {"b": "2"}
    assert parse_cookies("a=x=y") == {"a": "x=y"}
    assert parse_cookies("") == {}


_NAME = st.text(alphabet="abcdefgXYZ_-0123", min_size=1, max_size=10)
_VALUE = st.text(alphabet="abcXYZ0123-_.:/=+", max_size=20)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=8), st.sampled_from(["; ", ";", " ;  "]))
def test_parse_cookies_round_trip(pairs, sep):
    header = sep.join(f"{n}={v}" for n, v in pairs)
    want: dict[str, str] = {}
    for n, v in pairs:
        want.setdefault(n, v)
    assert parse_cookies(header) == want


@given(st.text(max_size=200))
def test_parse_cookies_never_raises(header):
    result = parse_cookies(header)
    assert all(isinstance(k, str) and k for k in result)


def test_cookies_of_is_parse_cookies_remembered_and_bounded():
    from proxy.core import router

    value = "gg_uid=abc; other=1"
    assert cookies_of(value) == parse_cookies(value)
    assert cookies_of(value) is cookies_of(value)
    for i in range(router.COOKIE_CACHE_ENTRIES + 5):
        assert cookies_of(f"c{i}=v{i}") == {f"c{i}": f"v{i}"}
        assert len(router._COOKIES) <= router.COOKIE_CACHE_ENTRIES
    long = "a=" + "x" * router.COOKIE_CACHE_CHARS
    assert cookies_of(long) == parse_cookies(long) and long not in router._COOKIES


def test_valid_cohort_value_verdicts_are_remembered_and_bounded():
    from proxy.core import router

    for i in range(router.CACHE_ENTRIES + 5):
        assert valid_cohort_value(f"u{i}") and not valid_cohort_value(f"u {i}")
        assert len(router._VALID) <= router.CACHE_ENTRIES
    assert valid_cohort_value("x" * 128) and not valid_cohort_value("x" * 129)
