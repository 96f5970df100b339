"""ProcessFleet with a real mosquitto and real agents: every fault verb, seen over MQTT."""

# Fixtures imported from tests/fleet_fixtures.py are parameters here, by design:
# ruff: noqa: F811

from __future__ import annotations

import json
import time

import pytest

from shared.protocol import PresenceState
from skipfleet.fleet.base import CutMode, DeviceState, DeviceStateError, UnknownDevice
from skipfleet.fleet.runstate import RUN_STATE_FILE
from tests.fleet_fixtures import (  # noqa: F401 (fixtures)
    Watch,
    fan_scenario,
    fleet,
    make_fleet,
    wait_until,
    watch,
)

pytestmark = pytest.mark.slow
OFFLINE, ONLINE = PresenceState.OFFLINE, PresenceState.ONLINE
QUIET_WINDOW_S = 1.5  # three heartbeat periods: long enough to notice missing heartbeats


def ids(fleet) -> list[str]:
    return [d.device_id for d in fleet.devices()]


def test_kill_sends_the_will_and_restart_reuses_the_state_dir(fleet, watch, mosquitto):
    dev = ids(fleet)[0]
    first_online = watch.presence(dev, ONLINE)
    state_dir = fleet.run_dir / "devices" / dev / "state"
    assert (state_dir / "spool.sqlite").exists()
    since = watch.mark()
    killed = fleet.kill(dev)
    assert killed.state is DeviceState.DEAD and "SIGKILL" in killed.detail
    watch.presence(dev, OFFLINE, since)  # the broker's Last Will: the agent said nothing
    late = Watch(mosquitto.url)  # a new subscriber gets the Will as the retained status
    try:
        late.probe.wait_for(lambda t, e, r: r and e.sender == dev and
                            e.message.state is OFFLINE, 10)  # fmt: skip
    finally:
        late.close()
    with pytest.raises(DeviceStateError, match="dead"):
        fleet.pause(dev)
    since = watch.mark()
    restarted = fleet.restart(dev)
    assert restarted.state is DeviceState.RUNNING and "boot 2" in restarted.detail
    again = watch.presence(dev, ONLINE, since)
    assert again.boot_id != first_online.boot_id  # a new process ...
    assert (state_dir / "spool.sqlite").exists()  # ... on the same state dir
    logs = sorted(p.name for p in (fleet.run_dir / "devices" / dev).glob("agent-*.log"))
    assert logs == ["agent-0.log", "agent-1.log"]


def test_pause_silences_the_agent_until_resume(fleet, watch):
    quiet, chatty = ids(fleet)[:2]
    since = watch.mark()
    paused = fleet.pause(quiet)
    paused_at = time.time()
    assert paused.state is DeviceState.PAUSED
    # A frozen agent sends no PINGREQ either: after 1.5 keepalives the broker gives up on it.
    watch.presence(quiet, OFFLINE, since)
    watch.heartbeat(chatty, created_after=paused_at + QUIET_WINDOW_S)
    assert watch.heartbeats_since(quiet, paused_at) == 0
    since = watch.mark()
    resumed = fleet.resume(quiet)
    assert resumed.state is DeviceState.RUNNING
    watch.heartbeat(quiet, created_after=time.time())
    watch.presence(quiet, ONLINE, since)


def test_blackhole_cut_is_found_by_keepalive_and_restore_brings_it_back(fleet, watch, mosquitto):
    dev, other = ids(fleet)[1:]
    since = watch.mark()
    info = fleet.cut(dev, CutMode.BLACKHOLE)
    assert info.state is DeviceState.CUT and info.pid is not None
    watch.presence(dev, OFFLINE, since)
    # Nobody closed anything: the broker's keepalive (1.5 x 1 s) noticed the silence.
    assert f"Client {dev} has exceeded timeout" in mosquitto.log()
    assert fleet.device(dev).state is DeviceState.CUT  # the process itself runs on
    watch.heartbeat(other, created_after=time.time())  # the others are unaffected
    since = watch.mark()
    assert fleet.restore(dev).state is DeviceState.RUNNING
    watch.presence(dev, ONLINE, since)


def test_refuse_cut_is_seen_at_once_and_broker_cut_hits_everybody(
    mosquitto, fan_scenario, tmp_path, watch
):
    # Device 0 keeps the default 30 s keepalive: an offline within seconds cannot be keepalive.
    slow_keepalive = {0: ("--keepalive-seconds", "30")}
    with make_fleet(mosquitto, fan_scenario, tmp_path / "run", overrides=slow_keepalive) as fleet:
        devs = ids(fleet)
        for dev in devs:
            watch.presence(dev, ONLINE)
        since = watch.mark()
        fleet.cut(devs[0], CutMode.REFUSE)
        watch.presence(devs[0], OFFLINE, since, timeout=5.0)
        since = watch.mark()
        rows = fleet.cut_broker(CutMode.REFUSE)
        assert {r.state for r in rows} == {DeviceState.CUT}
        for dev in devs[1:]:
            watch.presence(dev, OFFLINE, since, timeout=5.0)
        since = watch.mark()
        assert fleet.restore(devs[0]).state is DeviceState.CUT  # the broker is still cut
        rows = fleet.restore_broker()
        assert {r.state for r in rows} == {DeviceState.RUNNING}
        for dev in devs:
            watch.presence(dev, ONLINE, since)


def test_scale_up_and_down_and_the_run_state(fleet, watch):
    run_state = fleet.run_dir / RUN_STATE_FILE
    rows = fleet.scale(4)
    assert len(rows) == 4 and rows[3].device_id == "fan-extra-3"
    watch.presence("fan-extra-3", ONLINE)
    state = json.loads(run_state.read_text())
    assert state["running"] and state["broker"] == fleet.broker_url
    assert [d["device_id"] for d in state["devices"]] == ids(fleet)
    assert all(d["pid"] and d["proxy_port"] and d["log_path"] for d in state["devices"])
    removed = ids(fleet)[2:]
    since = watch.mark()
    rows = fleet.scale(2)
    assert [r.device_id for r in rows] == ids(fleet) and len(rows) == 2
    for dev in removed:  # stopped gracefully: the agent announced it itself
        watch.presence(dev, OFFLINE, since)
    assert [d["device_id"] for d in json.loads(run_state.read_text())["devices"]] == ids(fleet)
    assert not list(fleet.run_dir.glob(".fleet-*")), "no temporary run-state files left"
    with pytest.raises(UnknownDevice, match="fan-extra-3"):
        fleet.kill("fan-extra-3")


def test_stop_ends_every_agent_gracefully(mosquitto, fan_scenario, tmp_path, watch):
    fleet = make_fleet(mosquitto, fan_scenario, tmp_path / "run").start()
    devs = ids(fleet)
    for dev in devs:
        watch.presence(dev, ONLINE)
    pids = [d.pid for d in fleet.devices()]
    fleet.stop()
    rows = fleet.devices()
    assert {r.state for r in rows} == {DeviceState.DEAD}
    assert all("exit 0" in r.detail for r in rows), [r.detail for r in rows]
    wait_until(lambda: not any(_running(pid) for pid in pids))
    state = json.loads((tmp_path / "run" / RUN_STATE_FILE).read_text())
    assert state["running"] is False and state["control_url"] is None


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
