"""Scalar parsers: durations, sizes, integers, names, addresses, endpoints, ${ENV}.

Each takes a loaded value and its dotted path and raises ConfigError naming both.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Mapping
from typing import NoReturn, TypeVar

from proxy.core.config.model import NO_VALUE, Address, ConfigError, Endpoint


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


def _str_or_empty(value: object, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, "must be a string (quote it in YAML)", value)
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


# --- durations for people ---------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"
