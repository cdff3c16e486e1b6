import json
import os

import pytest

from proxy.control.store.events import Event, EventLog
from proxy.control.store.file import EVENTS_ON_DISK, FileStateStore, StateFileError, merge_states
from proxy.core.config.load import parse_config
from proxy.core.config.model import PauseStep, WeightStep
from proxy.core.state import RolloutStatus, RouteState


def route(name, versions=("blue", "green"), stable="blue"):
    weights = {v: (100 if v == stable else 0) for v in versions}
    return {
        "name": name,
        "match": {"host": "*", "path_prefix": f"/{name}"},
        "versions": {
            v: {"endpoints": [f"http://127.0.0.1:{9001 + i}"]} for i, v in enumerate(versions)
        },
        "stable": stable,
        "weights": weights,
    }


def config(*routes):
    return parse_config({"routes": list(routes)}, env={})


def sample_state():
    return RouteState(
        weights=(("blue", 75), ("green", 25)),
        stable="blue",
        standby=None,
        rollout=RolloutStatus(
            phase="paused",
            canary="green",
            steps=(WeightStep(5), PauseStep(None), PauseStep(600.0), WeightStep(100)),
            step=2,
            step_started=1700000000.5,
            failures=1,
            inconclusive=3,
            last_verdict={"verdict": "fail", "canary_error_rate": 0.2},
        ),
        revision=7,
    )


# ---- EventLog ------------------------------------------------------------------------------


def test_event_log_ids_filters_and_bound():
    clock = iter(range(100, 10000))
    log = EventLog(limit=5, clock=lambda: float(next(clock)))
    seen = []
    log.subscribe(seen.append)
    for i in range(8):
        log.append("shop" if i % 2 else "api", "token", "weights", {"i": i}, {"i": i + 1}, "r")
    assert len(log) == 5
    assert [e.id for e in log.since()] == [4, 5, 6, 7, 8]
    assert [e.id for e in log.since(6)] == [7, 8]
    assert [e.id for e in log.since(0, route="shop")] == [4, 6, 8]
    assert [e.id for e in seen] == list(range(1, 9))
    assert seen[0].time == 100.0


def test_event_log_continues_ids_after_restart():
    old = [Event(41, 1.0, "shop", "a", "weights", None, None, None, None)]
    log = EventLog(old)
    assert log.append(None, "b", "reload", None, None).id == 42


# ---- FileStateStore ------------------------------------------------------------------------


def test_load_missing_file_is_none(tmp_path):
    assert FileStateStore(tmp_path / "nope.json").load() is None


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "state.json"
    store = FileStateStore(path)
    log = EventLog()
    for i in range(EVENTS_ON_DISK + 30):
        log.append("shop", "127.0.0.1", "weights", {"n": i}, {"n": i + 1}, f"r{i}", {"x": 0.5})
    states = {"shop": sample_state(), "api": RouteState((("blue", 100),), "blue")}
    store.save(states, log.since())

    loaded_states, loaded_events = store.load()
    assert loaded_states == states
    assert len(loaded_events) == EVENTS_ON_DISK
    assert loaded_events == log.since()[-EVENTS_ON_DISK:]
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["routes"]["shop"] == sample_state().to_json()
    # Only the state file remains: the temp file was renamed, not left behind.
    assert os.listdir(tmp_path) == ["state.json"]


def test_non_finite_figures_are_saved_as_null(tmp_path):
    store = FileStateStore(tmp_path / "state.json")
    state = RouteState(
        (("blue", 100), ("green", 0)),
        "blue",
        rollout=RolloutStatus(last_verdict={"ratio": float("inf"), "p": [float("nan"), 1.0]}),
    )
    event = Event(1, 5.0, "shop", "rollout", "verdict", None, None, None, {"z": float("-inf")})
    store.save({"shop": state}, [event])
    states, events = store.load()
    assert states["shop"].rollout.last_verdict == {"ratio": None, "p": [None, 1.0]}
    assert events[0].figures == {"z": None}


def test_save_replaces_whole_file(tmp_path):
    store = FileStateStore(tmp_path / "state.json")
    store.save({"shop": sample_state()}, [])
    store.save({"api": RouteState((("blue", 100),), "blue")}, [])
    states, events = store.load()
    assert list(states) == ["api"]
    assert events == []


def test_failed_save_keeps_old_file(tmp_path):
    path = tmp_path / "state.json"
    store = FileStateStore(path)
    store.save({"shop": sample_state()}, [])
    before = path.read_bytes()
    bad = Event(1, 5.0, None, "a", "x", None, None, None, {"x": object()})  # not JSON
    with pytest.raises(TypeError):
        store.save({"shop": sample_state()}, [bad])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"version": 2, "routes": {}}', "format version"),
        ('{"version": 1, "routes": []}', "'routes'"),
        (
            '{"version": 1, "routes": {"shop": {"weights": {"blue": 120}, "stable": "blue", '
            '"revision": 1}}}',
            "weights.blue",
        ),
        (
            '{"version": 1, "routes": {"shop": {"weights": {"blue": 100}, "stable": "blue", '
            '"revision": 1, "rollout": {"state": "flying"}}}}',
            "rollout",
        ),
        ('{"version": 1, "routes": {}, "events": [{"id": "x"}]}', "event id"),
        ('{"version": 1, "routes": {}, "events": NaN}', "not valid JSON"),
    ],
)
def test_corrupt_file_names_file_and_reset_flag(tmp_path, text, fragment):
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(StateFileError) as info:
        FileStateStore(path).load()
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "--reset-state" in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StateFileError, match="--reset-state"):
        FileStateStore(path).load()


# ---- merge_states --------------------------------------------------------------------------


def test_merge_keeps_fitting_states_and_drops_the_rest():
    cfg = config(
        route("shop"),
        route("api"),
        route("search"),
        route("new"),
        route("renamed", versions=("blue", "purple")),
    )
    loaded = {
        # weights in a different order than config: kept, reordered
        "shop": RouteState((("green", 40), ("blue", 60)), "blue", revision=5),
        # stable no longer a version
        "api": RouteState((("blue", 0), ("green", 100)), "red", revision=3),
        # version names differ from config
        "search": RouteState((("blue", 50), ("red", 50)), "blue", revision=2),
        "renamed": RouteState((("blue", 50), ("green", 50)), "blue", revision=2),
        # route removed from config
        "gone": RouteState((("blue", 100), ("green", 0)), "blue", revision=9),
    }
    merged = merge_states(cfg, loaded)
    assert merged == {"shop": RouteState((("blue", 60), ("green", 40)), "blue", revision=5)}


def test_merge_keeps_rollout_and_standby():
    cfg = config(route("shop"))
    state = sample_state()
    assert merge_states(cfg, {"shop": state}) == {"shop": state}
    promoted = RouteState(
        (("blue", 0), ("green", 100)),
        "green",
        standby="blue",
        rollout=RolloutStatus(phase="promoted", canary="green"),
    )
    assert merge_states(cfg, {"shop": promoted}) == {"shop": promoted}
    bad_standby = RouteState((("blue", 0), ("green", 100)), "green", standby="red")
    assert merge_states(cfg, {"shop": bad_standby}) == {}
