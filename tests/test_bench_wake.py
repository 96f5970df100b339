"""`python -m skipfleet.bench_wake`: a row of figures for each gap, each row's ratio against
the first (the hot cost), the work a real heartbeat made and encoded (its speed is the
benchmark's to show, not a test's to assert)."""

from __future__ import annotations

import re

import pytest

from shared.protocol import decode
from shared.protocol.messages import Heartbeat
from skipfleet.bench_wake import heartbeat_made_and_encoded, main

ROW = re.compile(r"^\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def test_the_work_measured_is_a_heartbeat_a_device_would_send():
    envelope = decode(heartbeat_made_and_encoded(7))
    assert isinstance(envelope.message, Heartbeat)
    assert envelope.sender == "dev-00001" and envelope.seq == 7


def test_the_wake_benchmark_prints_the_cpu_for_each_gap_against_the_hot_cost(capsys):
    assert main(["--gaps", "0,0.002", "--repeat", "20"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["asleep", "s", "cpu", "µs", "x", "hot"]
    parsed = [ROW.match(row) for row in rows]
    assert all(parsed) and [float(m.group(1)) for m in parsed] == [0.0, 0.002]
    (hot, slept) = (float(m.group(2)) for m in parsed)
    assert hot > 0 and slept > 0
    assert abs(float(parsed[1].group(3)) - slept / hot) < 0.06  # each row against the first


def test_the_wake_benchmark_refuses_a_negative_gap():
    with pytest.raises(SystemExit):
        main(["--gaps", "-1"])
