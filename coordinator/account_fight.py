"""Telling two coordinators fighting over one MQTT account from a broker restart or a bad link.

A broker with `use_username_as_clientid` gives every connection of an account the same client
id, and a new connection under a client id closes the old one. Mosquitto 2.0.11 (Debian 12)
closes it without the MQTT v5 DISCONNECT 0x8E "Session taken over" (the bridge ends on that one
directly): the kicked coordinator only sees its socket close, reconnects after paho's 1-2 s
backoff and kicks the other one, forever. What sets that fight apart, as seen from one side:

- each connection was ACCEPTED (CONNACK success) and then closed by the peer without a
  DISCONNECT packet, within about the other side's reconnect delay;
- the very next attempt is accepted again at once: the broker is up all along.

A broker restart or a crash loop refuses connections while it is down (paho's on_connect_fail,
or a socket reset before any CONNACK), a flaky link fails attempts too, and a link that drops
connections after a while outlasts `short_s`: each of those resets the count. Only `streak`
short sessions in a row, with no failed attempt between them, are taken for a fight. The two
sides' sessions alternate (each connection closes the other's), so the side kicked first (the
newcomer, unless both started within `short_s`) reaches the streak first, stops, and the other
one keeps its connection.

Not told apart: a link that accepts every connection and drops it within `short_s`, `streak`
times in a row, with no attempt failing between (the coordinator then stops with exit 75; a
supervisor restarts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Connections in a row that must end short before the coordinator calls it a fight: with paho's
# 1-2 s backoff 8-16 s of fighting, 2 x FIGHT_STREAK takeovers in all (each side's connections).
FIGHT_STREAK = 4
# A session shorter than the other side's longest first reconnect delay (paho's jittered lower
# bound is at most twice reconnect_min_delay_s) plus this margin for connecting counts as short.
SHORT_MARGIN_S = 5.0


def short_session_s(reconnect_min_delay_s: float) -> float:
    return 2 * reconnect_min_delay_s + SHORT_MARGIN_S


@dataclass(frozen=True)
class Fight:
    """What the detector saw: `sessions` connections in a row, each closed by the peer within
    `short_s` of being accepted."""

    sessions: int
    short_s: float


class AccountFightDetector:
    """Fed the bridge's connection events (paho's network thread only); `closed` answers a Fight
    once `streak` accepted connections in a row ended short. Plain and clock-driven: tests
    replay event sequences without a broker."""

    def __init__(
        self,
        short_s: float,
        streak: int = FIGHT_STREAK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if streak < 2 or short_s <= 0:
            raise ValueError("a fight needs streak >= 2 and short_s > 0")
        self._short_s = short_s
        self._streak = streak
        self._clock = clock
        self._accepted_at: float | None = None  # the open connection's CONNACK, if any
        self._short_in_a_row = 0

    def accepted(self) -> None:
        """CONNACK success."""
        self._accepted_at = self._clock()

    def attempt_failed(self) -> None:
        """No connection (TCP refused, timed out) or a CONNACK refusal: the broker or the link
        is down, which a fight never shows."""
        self._accepted_at = None
        self._short_in_a_row = 0

    def closed(self, *, disconnect_from_broker: bool) -> Fight | None:
        """The connection ended. `disconnect_from_broker`: the broker sent a DISCONNECT packet
        (a reason it states, e.g. shutting down): not the silent close of a taken-over id."""
        accepted_at, self._accepted_at = self._accepted_at, None
        if accepted_at is None or disconnect_from_broker:
            self._short_in_a_row = 0  # reset before its CONNACK: a failed attempt
            return None
        if self._clock() - accepted_at > self._short_s:
            self._short_in_a_row = 0
            return None
        self._short_in_a_row += 1
        if self._short_in_a_row < self._streak:
            return None
        return Fight(self._short_in_a_row, self._short_s)


def describe_fight(fight: Fight, account: str | None, client_id: str, broker_url: str) -> str:
    """The operator's message: which account, what was seen, what to do."""
    who = f"the MQTT account {account!r}" if account else f"the MQTT client id {client_id!r}"
    return (
        f"another client keeps connecting to {broker_url} with {who}: {fight.sessions} "
        f"connections in a row were accepted and then closed within {fight.short_s:.0f} s, "
        f"while the broker stayed up (a broker with use_username_as_clientid makes the account "
        f"the client id, so each connection closes the other's). Two coordinators on one "
        f"account? Stopping rather than fighting over it. Give each coordinator its own "
        f"account: deploy/mosquitto/make-accounts.sh --coordinator NAME N, reload the broker, "
        f"then start this one with --username coordinator-NAME --password-file "
        f"deploy/secrets/coordinator-NAME_password --instance NAME; with --partitions P, "
        f"make-accounts.sh --coordinator NAME --partitions P N also makes each partition's "
        f"account (deploy/README.md, 'More than one coordinator')"
    )
