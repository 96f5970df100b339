"""`python -m skipfleet.bench_broker`: every message published reaches its subscriber through a
private mosquitto, and the figures are printed (the figures themselves: docs/benchmarks.md)."""

from __future__ import annotations

import re

import pytest

from skipfleet.bench_broker import main


def test_the_broker_benchmark_delivers_every_message_and_prints_its_figures(capsys):
    assert main(["--clients", "4", "--messages", "25", "--qos", "1"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"mosquitto: [\d,]+ messages/s delivered; broker CPU ", out)
    assert "4 clients x 25 messages, QoS 1, MQTT 5" in out


def test_a_broker_of_your_own_needs_its_pid_too(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--port", "1883"])
    assert stop.value.code == 2
    assert "--port and --pid go together" in capsys.readouterr().err
