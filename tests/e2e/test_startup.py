"""Start-up failures of the real `graygate serve`: each is one log line naming the cause,
exit status 2, no traceback, and no port left bound (issue 9, lifetimes)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import Process, free_port, route_config


def write_config(tmp_path: Path, **top: Any) -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "state": {"path": str(tmp_path / "state.json")},
        "routes": [route_config(f"http://127.0.0.1:{free_port()}")],
        **top,
    }
    path = tmp_path / "graygate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, port, admin_port


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def held_port() -> Iterator[Callable[[], int]]:
    """A port some other program listens on."""
    socks: list[socket.socket] = []

    def hold() -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks.append(s)
        return int(s.getsockname()[1])

    yield hold
    for s in socks:
        s.close()


def unwritable_state(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        return "/sys/graygate-state.json"  # sysfs refuses new files even to root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro / "state.json")


def file_child(tmp_path: Path) -> str:
    (tmp_path / "plain-file").write_text("not a directory\n")
    return str(tmp_path / "plain-file" / "state.json")


CASES: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "unwritable state path": (
        lambda tmp, hold: {"state": {"path": unwritable_state(tmp)}},
        r"state\.path \S+: cannot write the state file: (Permission denied|Read-only)",
    ),
    "state path under a file": (
        lambda tmp, hold: {"state": {"path": file_child(tmp)}},
        r"state\.path \S+: \S+plain-file is a file, not a directory",
    ),
    "state path in a missing directory": (
        lambda tmp, hold: {"state": {"path": str(tmp / "nowhere" / "state.json")}},
        r"state\.path \S+: directory \S+nowhere does not exist",
    ),
    "state path is a directory": (
        lambda tmp, hold: {"state": {"path": str(tmp)}},
        r"state\.path \S+: is a directory, not a file",
    ),
    "listen port in use": (
        lambda tmp, hold: {"listen": f"127.0.0.1:{hold()}"},
        r"listen: cannot bind 127\.0\.0\.1:\d+: .*address already in use",
    ),
    "listen port in use, workers: 2": (
        lambda tmp, hold: {"listen": f"127.0.0.1:{hold()}", "workers": 2},
        r"listen: cannot bind 127\.0\.0\.1:\d+: .*(?i:address already in use)",
    ),
    "admin port in use, workers: 2": (
        lambda tmp, hold: {"admin": {"listen": f"127.0.0.1:{hold()}"}, "workers": 2},
        r"admin\.listen: cannot bind 127\.0\.0\.1:\d+: .*address already in use",
    ),
    "admin port in use": (
        lambda tmp, hold: {"admin": {"listen": f"127.0.0.1:{hold()}"}},
        r"admin\.listen: cannot bind 127\.0\.0\.1:\d+: .*address already in use",
    ),
    "bad redis url": (
        lambda tmp, hold: {"state": {"backend": "redis", "redis_url": "redis://127.0.0.1:x/0"}},
        r"state\.redis_url redis://127\.0\.0\.1:x/0: .*[Pp]ort",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_start_failure_is_one_line_and_exit_2(
    tmp_path: Path, graygate_process: Callable[..., Process], held_port, case: str
) -> None:
    make, pattern = CASES[case]
    path, port, admin_port = write_config(tmp_path, **make(tmp_path, held_port))
    p = graygate_process("serve", "-c", path.name)
    assert p.proc.wait(30) == 2, p.output()
    lines = [line for line in p.output().splitlines() if line.strip()]
    assert len(lines) == 1, p.output()
    assert "Traceback" not in lines[0]
    assert "cannot start: " in lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    if not case.startswith("listen port in use"):
        assert refuses(port)
    if not case.startswith("admin port in use"):
        assert refuses(admin_port)
