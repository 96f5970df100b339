"""Fixtures of the fleet tests: a fan scenario, a real mosquitto, a probe and a ProcessFleet.

Agents run with a 0.5 s heartbeat, a 1 s keepalive (the broker drops a silent client after
1.5 s), no will delay and a 2 s reconnect cap, so every fault shows within seconds. Import the
fixtures by name into a test module to use them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.mqtt import parse_broker_url
from shared.protocol import Heartbeat, Presence, PresenceState
from skipfleet.fleet.supervisor import AgentSpec, ProcessFleet
from skipfleet.probe import FleetProbe
from skipfleet.scenario import Scenario, build_scenario

FAST_AGENT = (
    "--heartbeat-seconds", "0.5", "--keepalive-seconds", "1", "--will-delay-seconds", "0",
    "--reconnect-max-seconds", "2", "--power-profile", "generic", "--log-level", "DEBUG",
)  # fmt: skip
ONLINE_S = 15.0  # start-up or reconnect of an agent: about 1 s here, generous for a busy CI
_probe_ids = itertools.count()


@pytest.fixture(scope="session")
def fan_scenario(data_dir, tmp_path_factory) -> Scenario:
    out = tmp_path_factory.mktemp("fleet-scenario")
    return build_scenario("fan", 3, data_dir, out, drift=False, pretrain_epochs=2,
                          log=lambda _: None)  # fmt: skip


def spec_factory(scenario: Scenario):
    """Device i: the scenario's devices first, then extra devices sharing their data files."""

    def spec(index: int) -> AgentSpec:
        if index < len(scenario.devices):
            device = scenario.devices[index]
            return AgentSpec(device.device_id, device.data_file)
        data = scenario.devices[index % len(scenario.devices)].data_file
        return AgentSpec(f"fan-extra-{index}", data)

    return spec


class Watch:
    """A FleetProbe on the broker itself (not behind a proxy), with the waits the tests need."""

    def __init__(self, broker_url: str) -> None:
        self.probe = FleetProbe(parse_broker_url(broker_url), f"fleet-test-{next(_probe_ids)}")

    def mark(self) -> frozenset[int]:
        """What arrived so far: waits given a mark only match messages arriving after it."""
        return frozenset(id(item[1]) for item in list(self.probe.received))

    def presence(self, device_id: str, state: PresenceState, since: frozenset[int] = frozenset(),
                 timeout: float = ONLINE_S) -> Presence:  # fmt: skip
        envelope, _ = self.probe.wait_for(
            lambda t, e, r: id(e) not in since and e.sender == device_id
            and isinstance(e.message, Presence) and e.message.state is state,
            timeout,
        )  # fmt: skip
        return envelope.message

    def heartbeat(self, device_id: str, created_after: float, timeout: float = ONLINE_S) -> None:
        """A heartbeat the device made after `created_after` (time.time(), its sent_at)."""
        self.probe.wait_for(
            lambda t, e, r: e.sender == device_id and isinstance(e.message, Heartbeat)
            and e.sent_at > created_after,
            timeout,
        )  # fmt: skip

    def heartbeats_since(self, device_id: str, created_after: float) -> int:
        return sum(
            1 for _, e, _, _ in list(self.probe.received)
            if e.sender == device_id and isinstance(e.message, Heartbeat)
            and e.sent_at > created_after
        )  # fmt: skip

    def close(self) -> None:
        self.probe.close()


@pytest.fixture
def watch(mosquitto) -> Iterator[Watch]:
    watch = Watch(mosquitto.url)
    yield watch
    watch.close()


def make_fleet(mosquitto, scenario: Scenario, run_dir: Path, n: int = 3,
               overrides: dict[int, tuple[str, ...]] | None = None) -> ProcessFleet:  # fmt: skip
    factory = spec_factory(scenario)
    specs = [factory(i) for i in range(n)]
    for index, extra in (overrides or {}).items():
        specs[index] = AgentSpec(specs[index].device_id, specs[index].data_file, extra)
    return ProcessFleet(mosquitto.url, scenario.base_model, specs, run_dir,
                        agent_args=FAST_AGENT, factory=factory, stop_timeout_s=10.0)  # fmt: skip


@pytest.fixture
def fleet(mosquitto, fan_scenario, tmp_path, watch) -> Iterator[ProcessFleet]:
    """Three agents, all online."""
    with make_fleet(mosquitto, fan_scenario, tmp_path / "run") as fleet:
        for device in fleet.devices():
            watch.presence(device.device_id, PresenceState.ONLINE)
        yield fleet


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)
