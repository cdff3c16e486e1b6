"""The Host rules: normal form and pattern match (router, policy, foreign check), and the
strict form the admin guard compares."""

import pytest

from proxy.core.hosts import compile_pattern, host_name, matches, strict_host_name


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


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("Admin.Example:9901", "admin.example"),
        ("admin.example.", "admin.example"),
        ("10.0.0.5:9901", "10.0.0.5"),
        ("[0:0::1]:9901", "[::1]"),  # IPv6: compressed, in brackets
        ("[FD00::1]", "[fd00::1]"),
        ("[::ffff:127.0.0.1]:80", "127.0.0.1"),  # IPv4-mapped: the IPv4 address
        ("", None),
        (":9901", None),
        ("a:b", None),  # a port must be digits
        ("::1", None),  # unlike host_name: an IPv6 Host value needs its brackets
        ("[fd00::1", None),
        ("[::1]x", None),
        ("[::1]:", None),
        ("[nothost]", None),
        ("user@evil.example", None),
        ("evil.example/x", None),
    ],
)
def test_strict_host_name(raw, name):
    assert strict_host_name(raw) == name
