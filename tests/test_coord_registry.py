"""Fleet registry: what is recorded, stale messages ignored, energy per period, restart."""

from __future__ import annotations

import pytest

from coordinator.clock import ManualClock
from coordinator.registry import FleetRegistry, UnknownDeviceError, cohort_id
from coordinator.state_db import StateDB

HASH = "ab" * 32


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=36_000.0)  # on an energy-period boundary


def open_registry(tmp_path, clock) -> FleetRegistry:
    return FleetRegistry(StateDB.in_dir(tmp_path), clock=clock, energy_period_s=3600.0)


def test_registry_survives_restart(tmp_path, clock):
    registry = open_registry(tmp_path, clock)
    registry.register("pi-1", base_model_hash=HASH, task="fan")
    registry.set_presence("pi-1", True)
    registry.record_heartbeat("pi-1", power_w=1.2, energy_j=100.0, temperature_c=41.5)
    registry.record_heartbeat("pi-1", energy_j=130.0, drift_score=0.2, adapter_version=3)
    registry.record_finetune("pi-1", accuracy_before=0.6, accuracy_after=0.95)
    registry.record_accuracy("pi-1", 0.9)

    restarted = open_registry(tmp_path, clock)  # what a restarted Ray actor's __init__ does
    record = restarted.require("pi-1")
    assert record.online and record.presence_since == clock()
    assert (record.power_w, record.temperature_c, record.drift_score) == (1.2, 41.5, 0.2)
    assert record.adapter_version == 3
    assert record.energy_j == 130.0
    assert restarted.energy_used_this_period(record) == 30.0
    assert (record.accuracy_before, record.accuracy_after) == (0.6, 0.95)
    assert record.accuracy_at_last_finetune == 0.95 and record.last_finetune_at == clock()
    assert record.accuracy == 0.9
    assert record.cohort == cohort_id(HASH, "fan") == "fan-abababababab"
    assert restarted.cohorts() == {"fan-abababababab": ["pi-1"]}


def test_presence_keeps_since_and_ignores_stale_messages(tmp_path, clock):
    registry = open_registry(tmp_path, clock)
    registry.set_presence("pi-1", True, at=100.0)
    registry.set_presence("pi-1", True, at=150.0)
    assert registry.require("pi-1").presence_since == 100.0
    registry.set_presence("pi-1", False, at=200.0)
    registry.set_presence("pi-1", True, at=180.0)  # re-delivered older "online"
    record = registry.require("pi-1")
    assert not record.online and record.presence_since == 200.0
    registry.record_heartbeat("pi-1", at=190.0)  # sent before the Will: not a sign of life
    assert not registry.require("pi-1").online
    registry.record_heartbeat("pi-1", at=210.0, temperature_c=40.0)
    registry.record_heartbeat("pi-1", at=205.0, temperature_c=99.0)  # out of order
    record = registry.require("pi-1")
    assert record.online and record.temperature_c == 40.0 and record.last_heartbeat_at == 210.0


def test_energy_used_per_period_handles_counter_reset_and_rollover(tmp_path, clock):
    registry = open_registry(tmp_path, clock)
    registry.record_heartbeat("pi-1", energy_j=1000.0)  # baseline: when it was used is unknown
    clock.advance(60)
    registry.record_heartbeat("pi-1", energy_j=1400.0)
    clock.advance(60)
    registry.record_heartbeat("pi-1", energy_j=50.0)  # device rebooted: counter restarted
    assert registry.energy_used_this_period(registry.require("pi-1")) == 450.0
    clock.advance(3600)  # next period, no report yet
    assert registry.energy_used_this_period(registry.require("pi-1")) == 0.0
    registry.record_heartbeat("pi-1", energy_j=80.0)
    assert registry.energy_used_this_period(registry.require("pi-1")) == 30.0


def test_bad_values_are_refused(tmp_path, clock):
    registry = open_registry(tmp_path, clock)
    with pytest.raises(ValueError, match="device id"):
        registry.set_presence("Pi_1", True)
    with pytest.raises(ValueError, match="accuracy must be in"):
        registry.record_accuracy("pi-1", 1.5)
    with pytest.raises(ValueError, match="temperature_c is not finite"):
        registry.record_heartbeat("pi-1", temperature_c=float("nan"))
    with pytest.raises(UnknownDeviceError):
        registry.require("pi-404")


def test_a_state_dir_from_before_a_new_column_still_opens(tmp_path, clock):
    db = StateDB.in_dir(tmp_path)
    from coordinator.registry import _SCHEMA

    before = _SCHEMA.replace(", drift_reference REAL", "")  # the release before it
    assert before != _SCHEMA
    db.ensure_schema(before)
    db.close()
    registry = FleetRegistry(StateDB.in_dir(tmp_path), clock=clock)
    registry.register("pi-old", base_model_hash="ab" * 32, task="fan")
    registry.record_heartbeat("pi-old", drift_score=2.5)
    registry.record_finetune("pi-old", accuracy_before=0.5, accuracy_after=0.9)
    assert registry.get("pi-old").drift_reference == 2.5
