"""`python -m skipfleet.bench_driver`: every message kind goes through the bridge's real steps
(it broke silently once when the bridge's hand-over changed and nothing ran it)."""

from __future__ import annotations

import re

from skipfleet.bench_driver import main


def test_the_driver_benchmark_runs_every_message_kind_and_prints_a_figure_for_each(capsys):
    assert main(["--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = [re.match(r"(in|out) +(.+?) +([\d.]+) µs CPU / message$", line) for line in lines]
    assert all(kinds) and len(kinds) == 8
    assert {m.group(2) for m in kinds} >= {
        "report",
        "report (A, B only)",
        "job",
        "desired (adapter inline)",
    }
    assert all(float(m.group(3)) > 0 for m in kinds)
