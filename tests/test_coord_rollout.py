"""Canary rollout: promote on no regression, roll back on regression, failure or deadline."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.adapter_store import AdapterStore
from coordinator.clock import ManualClock
from coordinator.rollout import RolloutError, RolloutManager, RolloutPolicy, RolloutState
from coordinator.state_db import StateDB

HASH = "12" * 32
COHORT = "fan-121212121212"
DEVICES = [f"pi-{i}" for i in range(10)]


class Setup:
    def __init__(self, tmp_path, **policy) -> None:
        self.tmp_path, self.clock = tmp_path, ManualClock()
        self.policy = RolloutPolicy(**policy)
        self.reopen()
        rng = np.random.default_rng(1)
        for _ in range(2):
            arrays = {"delta1": rng.normal(size=(4, 3)).astype(np.float32)}
            self.store.save(COHORT, arrays, base_model_hash=HASH, algorithm="exact-delta")
        self.store.set_current(COHORT, 1)

    def reopen(self) -> None:
        db = StateDB.in_dir(self.tmp_path)
        self.store = AdapterStore(db, self.tmp_path, clock=self.clock)
        self.rollouts = RolloutManager(db, self.store, policy=self.policy, clock=self.clock)


def test_canary_is_a_fraction_with_at_least_one_device(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.2)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES)
    assert len(rollout.canary_devices) == 2 and set(rollout.canary_devices) <= set(DEVICES)
    assert rollout.previous_version == 1
    desired = rollout.desired_versions(DEVICES)
    assert sorted(d for d, v in desired.items() if v == 2) == list(rollout.canary_devices)
    assert setup.store.current_version(COHORT) == 1  # nothing moves during the canary
    tiny = Setup(tmp_path / "tiny", canary_fraction=0.01).rollouts.start(COHORT, 2, ["pi-0"])
    assert tiny.canary_devices == ("pi-0",)


def test_canary_promotes_when_accuracy_does_not_regress(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.2, max_accuracy_regression=0.01)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-1")
    first, second = rollout.canary_devices
    undecided = setup.rollouts.record_result(
        "ro-1", first, accuracy_candidate=0.90, accuracy_current=0.92
    )
    assert undecided is None  # one canary still to report
    assert setup.rollouts.is_undecided("ro-1")
    repeat = setup.rollouts.record_result("ro-1", first, accuracy_candidate=0, accuracy_current=1)
    assert repeat is None and setup.rollouts.get("ro-1").results[first].accuracy_candidate == 0.90
    setup.reopen()  # restarted coordinator carries on
    rollout = setup.rollouts.record_result(
        "ro-1", second, accuracy_candidate=0.93, accuracy_current=0.92
    )
    assert rollout.state is RolloutState.PROMOTED  # mean 0.915 vs 0.92: within 0.01
    assert setup.store.current_version(COHORT) == 2
    assert set(rollout.desired_versions(DEVICES).values()) == {2}
    assert setup.rollouts.active(COHORT) is None


def test_canary_rolls_back_on_regression(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.1, max_accuracy_regression=0.01)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-2")
    (canary,) = rollout.canary_devices
    rollout = setup.rollouts.record_result(
        "ro-2", canary, accuracy_candidate=0.85, accuracy_current=0.90
    )
    assert rollout.state is RolloutState.ROLLED_BACK
    assert "regression" in rollout.reason
    assert setup.store.current_version(COHORT) == 1
    assert set(rollout.desired_versions(DEVICES).values()) == {1}  # the canary goes back too
    late = setup.rollouts.record_result("ro-2", canary, accuracy_candidate=1.0, accuracy_current=0)
    assert late.state is RolloutState.ROLLED_BACK  # a decision is final


def test_canary_rolls_back_when_one_device_is_wrecked_though_the_mean_holds(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.2, max_accuracy_regression=0.01)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-w")
    first, second = rollout.canary_devices
    setup.rollouts.record_result("ro-w", first, accuracy_candidate=0.95, accuracy_current=0.35)
    rollout = setup.rollouts.record_result(
        "ro-w", second, accuracy_candidate=0.35, accuracy_current=0.95
    )
    assert rollout.state is RolloutState.ROLLED_BACK  # mean 0.65 vs 0.65, but one loses 0.60
    assert f"{second} regresses by 0.6000" in rollout.reason


def test_a_failed_canary_rolls_back_at_once(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.3)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-3")
    rollout = setup.rollouts.record_failure("ro-3", rollout.canary_devices[0], "install failed")
    assert rollout.state is RolloutState.ROLLED_BACK and "install failed" in rollout.reason
    assert setup.store.current_version(COHORT) == 1


def test_a_silent_canary_rolls_back_after_the_deadline(tmp_path):
    setup = Setup(tmp_path, canary_fraction=0.2, canary_deadline_s=300)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-4")
    first, silent = rollout.canary_devices
    setup.rollouts.record_result("ro-4", first, accuracy_candidate=0.99, accuracy_current=0.9)
    setup.clock.advance(299)
    assert setup.rollouts.check_deadlines() == []
    setup.clock.advance(1)
    (decided,) = setup.rollouts.check_deadlines()
    assert decided.state is RolloutState.ROLLED_BACK and silent in decided.reason
    assert setup.store.current_version(COHORT) == 1
    assert setup.rollouts.check_deadlines() == []


def test_one_rollout_at_a_time_and_only_for_canaries(tmp_path):
    setup = Setup(tmp_path)
    rollout = setup.rollouts.start(COHORT, 2, DEVICES, rollout_id="ro-5")
    with pytest.raises(RolloutError, match="already has rollout ro-5"):
        setup.rollouts.start(COHORT, 2, DEVICES)
    outsider = next(d for d in DEVICES if d not in rollout.canary_devices)
    with pytest.raises(RolloutError, match="not a canary"):
        setup.rollouts.record_result("ro-5", outsider, accuracy_candidate=1, accuracy_current=1)
    with pytest.raises(RolloutError, match="no adapter version 7"):
        Setup(tmp_path / "other").rollouts.start(COHORT, 7, DEVICES)
