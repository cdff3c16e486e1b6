import argparse
import json
import random
import socket

import pytest
from aiohttp.test_utils import TestServer

from proxy.control import ctl
from proxy.control.admin import make_admin_app
from proxy.control.api import AdminContext
from proxy.control.store.events import EventLog
from proxy.core.config.load import parse_config
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from tests.helpers import route_config

TOKEN = "ctl-token"


def make_config():
    route = route_config("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    return parse_config({"routes": [route]}, env={})


class Admin:
    def __init__(self, token):
        config = make_config()
        self.store = PolicyStore(config)
        self.events = EventLog()
        self.stats = Stats.from_config(config, random.Random(0))

        async def reload():
            return None  # these tests never reload

        self.ctx = AdminContext(
            store=self.store,
            persist=lambda: None,
            events=self.events,
            registry=None,
            reload=reload,
            token=token,
            ready=lambda: True,
            stats=self.stats,
        )


@pytest.fixture
async def admin():
    a = Admin(None)
    async with TestServer(make_admin_app(a.ctx)) as server:
        a.url = str(server.make_url(""))
        yield a


@pytest.fixture
async def secured():
    a = Admin(TOKEN)
    async with TestServer(make_admin_app(a.ctx)) as server:
        a.url = str(server.make_url(""))
        yield a


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_status_table_and_json(admin, capsys):
    assert await ctl.status(admin.url, None, False) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()
    assert header.split() == ["ROUTE", "MATCH", "STABLE", "WEIGHTS", "ROLLOUT", "REV"]
    assert row.split() == ["shop", "*/", "blue", "blue=100", "green=0", "idle", "1"]

    assert await ctl.status(admin.url, None, True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["routes"][0]["weights"] == {"blue": 100, "green": 0}


async def test_status_one_route(admin, capsys):
    admin.stats.get("shop", "blue").record(200, "weight", 0.01)
    admin.stats.get("shop", "blue").record(503, "weight", 0.01)
    assert await ctl.status(admin.url, None, False, "shop") == 0
    out = capsys.readouterr().out
    assert "route shop" in out
    blue = next(line for line in out.splitlines() if line.startswith("blue"))
    assert blue.split()[:5] == ["blue", "100%", "2", "1", "50.00%"]


async def test_weights_changes_state_and_prints(admin, capsys):
    code = await ctl.weights(admin.url, None, "shop", ["blue=90", "green=10"], "try", None, False)
    assert code == 0
    assert dict(admin.store.state("shop").weights) == {"blue": 90, "green": 10}
    assert "shop: blue=90 green=10" in capsys.readouterr().out
    assert admin.events.since()[-1].reason == "try"


async def test_weights_refused_exit_2_with_api_message(admin, capsys):
    before = admin.store.state("shop")
    code = await ctl.weights(admin.url, None, "shop", ["blue=90", "green=20"], None, None, False)
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid" in err and "sum to 100" in err
    code = await ctl.weights(admin.url, None, "nope", ["blue=100"], None, None, False)
    assert code == 2
    assert "no route named 'nope'" in capsys.readouterr().err
    code = await ctl.weights(admin.url, None, "shop", ["blue=80", "green=20"], None, "9", False)
    assert code == 2
    assert "stale_revision" in capsys.readouterr().err
    assert admin.store.state("shop") == before


@pytest.mark.parametrize("bad", ["blue", "blue=", "=10", "blue=ten", "blue=-5"])
async def test_weights_bad_assignment_exit_2(admin, capsys, bad):
    code = await ctl.weights(admin.url, None, "shop", [bad], None, None, False)
    assert code == 2
    assert "VERSION=PERCENT" in capsys.readouterr().err
    assert admin.events.since() == []


async def test_token_required_and_used(secured, capsys):
    assert await ctl.status(secured.url, None, False) == 2
    assert "unauthorized" in capsys.readouterr().err
    assert await ctl.status(secured.url, TOKEN, False) == 0


async def test_rollout_and_events(admin, capsys):
    assert await ctl.rollout(admin.url, None, "start", "shop", "green", [20, 100], False) == 0
    out = capsys.readouterr().out
    assert "blue=80 green=20" in out and "progressing green step 1" in out
    assert await ctl.rollout(admin.url, None, "pause", "shop", None, None, False) == 0
    assert "paused" in capsys.readouterr().out
    assert await ctl.rollout(admin.url, None, "pause", "shop", None, None, False) == 2
    assert "conflict" in capsys.readouterr().err
    assert await ctl.rollout(admin.url, None, "promote", "shop", None, None, False) == 0
    assert "stable=green" in capsys.readouterr().out
    assert await ctl.rollback(admin.url, None, "shop", False, reason="oops") == 0
    assert "stable=blue" in capsys.readouterr().out

    assert await ctl.events(admin.url, None, "shop", 0, False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["ID", "TIME", "ROUTE", "ACTOR", "ACTION"]
    actions = [line.split()[5] for line in lines[1:]]
    assert actions == ["rollout.start", "rollout.pause", "rollout.promote", "rollback"]
    assert "blue 0->100, green 100->0, stable green->blue" in lines[-1] and "oops" in lines[-1]

    assert await ctl.events(admin.url, None, None, 3, True) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in data["events"]] == [4]


async def test_unreachable_admin_exit_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert await ctl.status(url, None, False) == 1
    err = capsys.readouterr().err
    assert f"cannot reach admin API at {url}" in err
    assert await ctl.weights(url, None, "shop", ["blue=100"], None, None, False) == 1


def parser():
    p = argparse.ArgumentParser(prog="graygate")
    ctl.add_arguments(p.add_subparsers(dest="command", required=True))
    return p


async def test_argparse_wiring_runs_commands(admin, capsys, monkeypatch):
    ns = parser().parse_args(
        ["weights", "shop", "blue=70", "green=30", "--admin", admin.url, "--reason", "cli"]
    )
    assert await ns.func(ns) == 0
    assert dict(admin.store.state("shop").weights) == {"blue": 70, "green": 30}
    assert "blue=70 green=30" in capsys.readouterr().out

    ns = parser().parse_args(
        ["rollout", "start", "shop", "--steps", "5,50,100", "--admin", admin.url, "--json"]
    )
    assert await ns.func(ns) == 0
    assert json.loads(capsys.readouterr().out)["state"]["rollout"]["steps"] == [5, 50, 100]
    assert admin.store.state("shop").rollout.canary == "green"
    assert dict(admin.store.state("shop").weights)["green"] == 5

    monkeypatch.setenv("GRAYGATE_ADMIN_URL", admin.url)
    monkeypatch.setenv("GRAYGATE_ADMIN_TOKEN", "from-env")
    ns = parser().parse_args(["events", "--since", "1"])
    assert ns.admin == admin.url and ns.token == "from-env" and ns.since == 1
    assert await ns.func(ns) == 0
    ns = parser().parse_args(["rollback", "shop"])
    assert await ns.func(ns) == 2  # not promoted: conflict

    with pytest.raises(SystemExit):
        parser().parse_args(["rollout", "start", "shop", "--steps", "5,abc"])
    with pytest.raises(SystemExit):
        parser().parse_args(["rollout", "explode", "shop"])


def test_steps_refused_by_the_config_files_rule(capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["rollout", "start", "shop", "--steps", "50,10"])
    assert exc.value.code == 2
    # The same words `graygate check` and the admin API use for the list.
    assert "--steps[1]: steps must increase; the previous weight step is 50, got 10" in (
        capsys.readouterr().err
    )


# ---- Host checks (DNS rebinding): the CLI keeps working through the names it is given -------


async def test_cli_through_localhost_name_changes_weights(admin, capsys):
    url = admin.url.replace("127.0.0.1", "localhost")
    code = await ctl.weights(url, None, "shop", ["blue=60", "green=40"], None, None, False)
    assert code == 0, capsys.readouterr().err
    assert dict(admin.store.state("shop").weights) == {"blue": 60, "green": 40}


async def test_cli_refused_for_a_name_the_admin_does_not_know(admin, capsys):
    # 0.0.0.0 reaches the loopback listener on Linux but names no host of the admin (the
    # "0.0.0.0 day" rebinding trick), so it stands for any foreign name, with no DNS.
    alias = "0.0.0.0"
    url = admin.url.replace("127.0.0.1", alias)
    before = admin.store.state("shop")
    code = await ctl.weights(url, None, "shop", ["blue=60", "green=40"], None, None, False)
    assert code == 2
    err = capsys.readouterr().err
    assert "forbidden_host" in err and "admin.allowed_hosts" in err
    assert admin.store.state("shop") == before and admin.events.since() == []

    admin.ctx.allowed_hosts = (alias.lower(),)
    assert await ctl.weights(url, None, "shop", ["blue=60", "green=40"], None, None, False) == 0
    assert dict(admin.store.state("shop").weights) == {"blue": 60, "green": 40}
