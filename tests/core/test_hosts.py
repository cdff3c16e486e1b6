"""The Host rules: normal form and pattern match (router, policy, foreign check), and the
strict form the admin guard compares."""

import ipaddress

import pytest

from proxy.control.guard import host_allowed
from proxy.core.config.load import parse_config
from proxy.core.hosts import address_form, compile_pattern, host_name, matches, strict_host_name

ROUTE = {
    "name": "shop",
    "versions": {"blue": {"endpoints": ["http://127.0.0.1:9"]}},
    "stable": "blue",
    "weights": {"blue": 100},
}


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


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        ("[::ffff:127.0.0.1]", "127.0.0.1"),  # IPv4-mapped: the IPv4 address, as the guard
        ("::FFFF:10.0.0.5", "10.0.0.5"),
        ("[::ffff:7f00:1]", "127.0.0.1"),  # the same address written in hex
        ("[0:0::1]", "[::1]"),
        ("fd00::2", "[fd00::2]"),
        ("10.0.0.5", "10.0.0.5"),
    ],
)
def test_an_allowed_hosts_entry_takes_the_form_the_guard_compares(entry, name):
    """admin.allowed_hosts and the admin guard's Host check share address_form: an entry
    matches a Host header naming the same address however either is written."""
    cfg = parse_config(
        {"listen": "127.0.0.1:0", "admin": {"allowed_hosts": [entry]}, "routes": [ROUTE]}, env={}
    )
    assert cfg.admin.allowed_hosts == (name,)
    bracketed = entry if entry.startswith("[") or ":" not in entry else f"[{entry}]"
    assert strict_host_name(f"{bracketed}:9901") == name
    assert host_allowed(f"{bracketed}:9901", "", "127.0.0.1", cfg.admin.allowed_hosts)
    assert address_form(ipaddress.ip_address(entry.strip("[]"))) == name
