"""Tests for the pure comparison in proxy/core/mirror.py: results and their precedence, the
JSON walk with ignored paths, truncation, and the noise floor's rule; no event loop."""

from __future__ import annotations

import random

from proxy.core.config.model import CompareConfig
from proxy.core.mirror import (
    MAX_JSON_DIFFS,
    NOISE_FIELDS,
    TRUNCATE,
    Capture,
    JsonDiff,
    MirrorStats,
    NoiseFloor,
    compare,
    truncate,
)

JSON = CompareConfig(body="json")


def cap(status: int = 200, body: object = None, digest: str = "d", **headers: str) -> Capture:
    c = Capture(status=status, headers=dict(headers), digest=digest, complete=True)
    if body is not None:
        c.json, c.json_ok = body, True
    return c


def test_identical_answers_match():
    a = cap(body={"a": [1, 2, {"b": None}]}, **{"content-type": "application/json"})
    b = cap(body={"a": [1, 2, {"b": None}]}, **{"content-type": "application/json"})
    r = compare(a, b, JSON)
    assert (r.result, r.status, r.headers, r.body, r.json_paths) == ("match", False, (), False, ())


def test_precedence_status_headers_body():
    rules = CompareConfig(headers=("content-type", "etag"), body="digest")
    a = cap(200, digest="x", **{"content-type": "a", "etag": "1"})
    r = compare(a, cap(500, digest="y", **{"content-type": "b", "etag": "1"}), rules)
    assert (r.result, r.headers, r.body) == ("status_mismatch", ("content-type",), True)
    r = compare(a, cap(200, digest="y", **{"content-type": "b", "etag": "1"}), rules)
    assert r.result == "header_mismatch"
    r = compare(a, cap(200, digest="y", **{"content-type": "a", "etag": "1"}), rules)
    assert r.result == "body_mismatch"
    off = CompareConfig(status=False, headers=(), body="none")
    assert compare(a, cap(500, digest="y"), off).result == "match"


def test_ignored_headers_and_a_missing_header():
    rules = CompareConfig(headers=("content-type", "date"), ignore_headers=("date",), body="none")
    a = cap(**{"content-type": "a", "date": "1"})
    assert compare(a, cap(**{"content-type": "a", "date": "2"}), rules).result == "match"
    assert compare(a, cap(date="1"), rules).headers == ("content-type",)


def test_shadow_error_wins():
    bad = Capture(error="connect to http://x failed")
    assert compare(cap(), bad, JSON).result == "shadow_error"
    assert compare(cap(), Capture(status=200), JSON).result == "shadow_error"  # incomplete


def test_json_diff_paths_and_values():
    a = {"id": 7, "items": [{"price": 10, "n": "x"}, {"price": 3}], "gone": True, "flag": True}
    b = {"id": 7, "items": [{"price": 12, "n": "x"}], "new": {"k": 1}, "flag": 1}
    r = compare(cap(body=a), cap(body=b), JSON)
    assert r.result == "body_mismatch"
    assert r.json_paths == (
        JsonDiff("$.items[0].price", "10", "12"),
        JsonDiff("$.items[1]", '{"price":3}', ""),
        JsonDiff("$.gone", "true", ""),
        JsonDiff("$.flag", "true", "1"),  # true and 1 differ in JSON
        JsonDiff("$.new", "", '{"k":1}'),
    )


def test_ignore_json_paths_with_wildcards_and_subtrees():
    rules = CompareConfig(
        body="json", ignore_json_paths=("$.timestamp", "$.items[*].id", "$.meta", "$.x[1]")
    )
    a = {"timestamp": 1, "items": [{"id": 1, "v": 1}, {"id": 2, "v": 2}], "meta": {"a": 1}}
    b = {"timestamp": 2, "items": [{"id": 9, "v": 1}, {"id": 8, "v": 2}], "meta": {"a": 2}}
    assert compare(cap(body=a), cap(body=b), rules).result == "match"
    r = compare(cap(body={"x": [1, 2, 3]}), cap(body={"x": [0, 5, 3]}), rules)
    assert [d.path for d in r.json_paths] == ["$.x[0]"]
    everything = CompareConfig(body="json", ignore_json_paths=("$",))
    assert compare(cap(body=[1]), cap(body={"a": 2}), everything).result == "match"


def test_json_falls_back_to_the_digest():
    # A body that did not parse (or was over max_json_bytes) has json_ok False.
    a, b = Capture(200, digest="aa", complete=True), Capture(200, digest="bb", complete=True)
    assert compare(a, b, JSON).result == "body_mismatch"
    assert compare(a, Capture(200, digest="aa", complete=True), JSON).result == "match"


def test_truncation_and_diff_limit():
    long = "x" * 500
    assert truncate(long) == '"' + "x" * (TRUNCATE - 2) + "\u2026"
    assert len(truncate(long)) == TRUNCATE
    a = {f"k{i}": i for i in range(100)}
    b = {f"k{i}": -i - 1 for i in range(100)}
    r = compare(cap(body=a), cap(body=b), JSON)
    assert len(r.json_paths) == MAX_JSON_DIFFS


def test_stats_record_and_window():
    ms = MirrorStats()
    ms.record("match", 0.002, None)
    ms.record("body_mismatch", 0.004, None)
    ms.drop("max_inflight")
    assert ms.results["match"] == 1 and ms.results["dropped"] == 1
    assert ms.take_window() == (2, 1) and ms.take_window() == (0, 0)


def test_noise_floor_random_field_on_stable_is_not_counted():
    floor = NoiseFloor()
    rng = random.Random(7)
    primary = cap(body={"id": 1, "nonce": rng.random()})
    for _ in range(50):
        canary = compare(primary, cap(body={"id": 1, "nonce": rng.random()}), JSON)
        stable = compare(primary, cap(body={"id": 1, "nonce": rng.random()}), JSON)
        floor.observe(canary, stable)
        assert canary.result == "body_mismatch"
        assert floor.judge(canary).result == "match"


def test_noise_floor_keeps_a_canary_only_difference():
    floor = NoiseFloor()
    primary = cap(body={"v": 1, "nonce": 0})
    for i in range(20):
        canary = compare(primary, cap(body={"v": 2, "nonce": i + 1}), JSON)
        stable = compare(primary, cap(body={"v": 1, "nonce": -i - 1}), JSON)
        floor.observe(canary, stable)
        judged = floor.judge(canary)
        assert judged.result == "body_mismatch"
        assert [d.path for d in judged.json_paths] == ["$.v"]


def test_noise_floor_thresholds():
    floor = NoiseFloor()
    same = compare(cap(), cap(), JSON)
    differs = compare(cap(500), cap(), JSON)
    # The canary differs 12 times in 100, stable 10: 12 <= 10 * 1.2, so noise.
    for i in range(100):
        floor.observe(differs if i < 12 else same, differs if i < 10 else same)
    assert not floor.counts("status")
    floor.observe(differs, same)  # 13 > 12, and (13 - 10) / 101 > 1 %
    assert floor.counts("status")
    assert floor.counts("header:never-seen")  # untracked fields count


def test_noise_floor_bounds_its_fields():
    floor = NoiseFloor()
    for i in range(NOISE_FIELDS + 10):
        c = compare(cap(body={f"k{i}": 1}), cap(body={f"k{i}": 2}), JSON)
        floor.observe(c, c)
    assert len(floor.canary) == NOISE_FIELDS
