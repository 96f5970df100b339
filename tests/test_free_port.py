"""The ports skipfleet's own servers get (skipfleet.brokers.free_port): free now, and outside the
range the kernel takes connections' own ports from, which the load generator's thousands of
connections use up and from which bind(0) would have picked."""

from __future__ import annotations

import socket

import pytest

from skipfleet import brokers


def test_a_free_port_is_below_the_connections_range_and_can_be_bound():
    low = brokers._ephemeral_low()
    assert low is not None and low > brokers.PORT_FLOOR  # Linux: 32768 by default
    assert brokers.PORT_FLOOR > 19_999  # above Ray's default range for its workers' ports
    for _ in range(20):
        port = brokers.free_port()
        assert brokers.PORT_FLOOR <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_passed_over(monkeypatch):
    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        used = taken.getsockname()[1]
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()  # free again (the kernel does not hand it out again at once)
        picks = iter([used, used, free])
        monkeypatch.setattr(brokers._PORTS, "randrange", lambda low, high: next(picks))
        monkeypatch.setattr(brokers, "_ephemeral_low", lambda: 65_000)
        monkeypatch.setattr(brokers, "_HANDED_OUT", set())
        assert brokers.free_port() == free


def test_a_port_is_handed_out_once_in_a_process_even_while_still_unbound(monkeypatch):
    picks = iter([30_003, 30_003, 30_005])
    monkeypatch.setattr(brokers._PORTS, "randrange", lambda low, high: next(picks))
    monkeypatch.setattr(brokers, "_ephemeral_low", lambda: 60_000)
    monkeypatch.setattr(brokers, "_HANDED_OUT", set())
    monkeypatch.setattr(brokers, "_bindable", lambda port: True)  # both free: neither bound yet
    assert [brokers.free_port(), brokers.free_port()] == [30_003, 30_005]


@pytest.mark.parametrize("ranges", [None, brokers.PORT_FLOOR + 5])
def test_without_room_below_the_range_any_free_port_will_do(monkeypatch, ranges):
    monkeypatch.setattr(brokers, "_ephemeral_low", lambda: ranges)
    port = brokers.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
