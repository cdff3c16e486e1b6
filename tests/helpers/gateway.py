"""The real App in-process on free loopback ports (what the `gateway` fixture starts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy.app import App
from proxy.core.config.load import parse_config


@dataclass
class RunningGateway:
    app: App
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


async def start_gateway(
    directory: Path, index: int, routes: list[dict[str, Any]], **top: Any
) -> RunningGateway:
    """The real App in-process on free loopback ports, its files under `directory`."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "state": {"path": str(directory / f"state-{index}.json")},
        "grace_period": "2s",
        "routes": routes,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = directory / f"graygate-{index}.yaml"
    path.write_text(yaml.safe_dump(data))
    app = App(str(path), parse_config(data, env={}, source=str(path)))
    await app.start()
    assert app.server is not None and app.admin_runner is not None
    port = app.server.sockets[0].getsockname()[1]
    admin_port = app.admin_runner.addresses[0][1]
    return RunningGateway(app, port, admin_port)


async def stop_gateway(gw: RunningGateway) -> None:
    gw.app.config = dataclasses.replace(gw.app.config, grace_period=0.5)
    await gw.app.shutdown()
