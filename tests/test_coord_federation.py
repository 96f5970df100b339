"""When a federated run goes on, stops, and which aggregate it rolls out."""

import pytest

from coordinator.federation import FederationPolicy, Measured, Next, RunProgress, is_last


def m(accuracy, loss=0.5):
    return Measured(accuracy, loss)


def test_a_run_continues_while_aggregates_gain_accuracy():
    run = RunProgress(FederationPolicy(max_rounds=10, min_gain=0.01, min_loss_drop=0.5))
    assert run.record_round({"a": m(0.5), "b": m(0.6)}).next is Next.CONTINUE  # measures start
    assert run.record_round({"a": m(0.7), "b": m(0.8)}).next is Next.CONTINUE  # +0.2
    assert run.record_round({"a": m(0.8), "b": m(0.85)}).next is Next.CONTINUE  # +0.075


def test_a_falling_loss_keeps_a_run_going_when_accuracy_is_saturated():
    run = RunProgress(FederationPolicy(min_gain=0.01, min_loss_drop=0.05, patience=1))
    run.record_round({"a": m(1.0, 0.40)})
    assert run.record_round({"a": m(1.0, 0.30)}).next is Next.CONTINUE  # loss −25 %
    decision = run.record_round({"a": m(1.0, 0.29)})  # −3 %: too little
    assert decision.next is Next.STOP
    assert decision.candidate == 2  # the best measured: lowest loss at equal accuracy


def test_a_run_stops_after_patience_stalled_aggregates_with_the_best_one():
    run = RunProgress(FederationPolicy(min_gain=0.01, min_loss_drop=0.5, patience=2))
    run.record_round({"a": m(0.5), "b": m(0.5)})  # the start
    run.record_round({"a": m(0.9), "b": m(0.9)})  # aggregate 1
    assert run.record_round({"a": m(0.89), "b": m(0.9)}).next is Next.CONTINUE  # stalled once
    decision = run.record_round({"a": m(0.9), "b": m(0.9)})  # stalled twice
    assert (decision.next, decision.candidate) == (Next.STOP, 1)
    assert "too little" in decision.reason


def test_gains_are_paired_over_the_devices_that_measured_both():
    run = RunProgress(FederationPolicy(min_gain=0.01, min_loss_drop=0.5, patience=1))
    run.record_round({"a": m(0.5), "b": m(0.9)})
    # b did not answer this round: a gained 0.3; a mean over different devices would say −0.1
    assert run.record_round({"a": m(0.8)}).next is Next.CONTINUE
    decision = run.record_round({"c": m(0.99)})
    assert decision.next is Next.STOP and "no device measured both" in decision.reason


def test_nothing_is_rolled_out_when_no_aggregate_beats_the_start():
    run = RunProgress(FederationPolicy(min_gain=0.01, min_loss_drop=0.5, patience=1))
    run.record_round({"a": m(0.9, 0.2)})
    decision = run.record_round({"a": m(0.8, 0.3)})
    assert (decision.next, decision.candidate) == (Next.STOP, None)


def test_the_round_budget_ends_a_run_on_the_last_aggregate_unmeasured():
    run = RunProgress(FederationPolicy(max_rounds=2, min_gain=0.0, min_loss_drop=0.0))
    assert not is_last(run.record_round({"a": m(0.5)}))
    decision = run.record_round({"a": m(0.6)})
    assert is_last(decision) and decision.candidate == 2  # aggregate this round, then stop


@pytest.mark.parametrize(
    "changes",
    [{"max_rounds": 0}, {"steps": 0}, {"min_gain": 1.0}, {"min_loss_drop": -0.1}, {"patience": 0}],
)
def test_policy_refuses_nonsense(changes):
    with pytest.raises(ValueError):
        FederationPolicy(**changes)
