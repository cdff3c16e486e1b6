"""The one Host rule: normal form and pattern match (used by router, policy, foreign check)."""

import pytest

from proxy.core.hosts import compile_pattern, host_name, matches


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("Shop.Example.com", "shop.example.com"),
        ("shop.example.com:8080", "shop.example.com"),
        ("shop.example.com.", "shop.example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # two colons, no brackets: an IPv6 literal kept whole
        ("127.0.0.1:80", "127.0.0.1"),
        ("", ""),
    ],
)
def test_host_name(raw, name):
    assert host_name(raw) == name


@pytest.mark.parametrize(
    ("pattern", "name", "hit"),
    [
        ("*", "anything.example", True),
        ("shop.example.com", "shop.example.com", True),
        ("Shop.Example.COM.", "shop.example.com", True),
        ("shop.example.com", "api.example.com", False),
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),  # the bare domain is not a subdomain
        ("*.example.com", "badexample.com", False),
    ],
)
def test_patterns(pattern, name, hit):
    assert matches(name, *compile_pattern(pattern)) is hit
