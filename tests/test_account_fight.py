"""Two coordinators on one account against a restarting broker or a bad link, as event
sequences (coordinator.account_fight); tests/test_account_fight_broker.py plays them on a real
mosquitto."""

from __future__ import annotations

import pytest

from coordinator.account_fight import (
    FIGHT_STREAK,
    AccountFightDetector,
    describe_fight,
    short_session_s,
)
from coordinator.clock import ManualClock

SHORT_S = short_session_s(1)  # the coordinator's default reconnect_min_delay_s


def detector() -> tuple[AccountFightDetector, ManualClock]:
    clock = ManualClock()
    return AccountFightDetector(SHORT_S, clock=clock), clock


def kicked_after(fight: AccountFightDetector, clock: ManualClock, lived_s: float):
    """One accepted connection closed silently after `lived_s`, then reconnecting 1.5 s later."""
    fight.accepted()
    clock.advance(lived_s)
    seen = fight.closed(disconnect_from_broker=False)
    clock.advance(1.5)
    return seen


def test_a_streak_of_connections_kicked_right_after_connecting_is_a_fight():
    fight, clock = detector()
    seen = [kicked_after(fight, clock, 1.0) for _ in range(FIGHT_STREAK)]
    assert seen[:-1] == [None] * (FIGHT_STREAK - 1)
    assert seen[-1] is not None and seen[-1].sessions == FIGHT_STREAK


def test_a_failed_attempt_between_short_sessions_starts_the_count_again():
    """A broker in a crash loop: up for a second at a time, refusing connections between."""
    fight, clock = detector()
    for _ in range(3 * FIGHT_STREAK):
        assert kicked_after(fight, clock, 1.0) is None
        fight.attempt_failed()  # paho's on_connect_fail: connection refused while it restarts


def test_a_reset_before_the_connack_counts_as_a_failed_attempt():
    """A cut link's proxy accepts TCP and resets it: paho reports a disconnect, no CONNACK."""
    fight, clock = detector()
    for _ in range(3 * FIGHT_STREAK):
        assert kicked_after(fight, clock, 1.0) is None
        assert fight.closed(disconnect_from_broker=False) is None  # never accepted


def test_a_connection_that_lived_past_the_short_limit_starts_the_count_again():
    fight, clock = detector()
    for _ in range(3):
        for _ in range(FIGHT_STREAK - 1):
            assert kicked_after(fight, clock, 1.0) is None
        assert kicked_after(fight, clock, SHORT_S + 0.1) is None


def test_a_disconnect_the_broker_states_is_not_a_silent_takeover():
    """A DISCONNECT packet with a reason (e.g. 0x8B server shutting down) is the broker's say."""
    fight, clock = detector()
    for _ in range(3 * FIGHT_STREAK):
        fight.accepted()
        clock.advance(1.0)
        assert fight.closed(disconnect_from_broker=True) is None


def test_the_short_limit_follows_the_reconnect_delay():
    """The other side reconnects after its jittered delay, at most twice the minimum."""
    assert short_session_s(1) == 7.0 and short_session_s(10) == 25.0
    with pytest.raises(ValueError):
        AccountFightDetector(SHORT_S, streak=1)


def test_the_message_names_the_account_and_what_to_do():
    fight, clock = detector()
    for _ in range(FIGHT_STREAK):
        seen = kicked_after(fight, clock, 1.0)
    message = describe_fight(seen, "coordinator", "coordinator", "mqtt://broker:1883")
    assert "'coordinator'" in message and "mqtt://broker:1883" in message
    assert "make-accounts.sh --coordinator NAME" in message and "--username" in message
    anonymous = describe_fight(seen, None, "skipfleet-coordinator-a", "mqtt://b:1883")
    assert "client id 'skipfleet-coordinator-a'" in anonymous
