"""`python -m skipfleet.bench_fleet_state`: the scan, the joins and the release run through the
fleet state's real steps and print their figures (small sizes: the figures, not the speed)."""

from __future__ import annotations

import re

from skipfleet.bench_fleet_state import main


def test_the_fleet_state_benchmark_scans_joins_and_releases_and_prints_each_figure(capsys):
    assert main(["--devices", "40", "--strangers", "10", "--reports", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    scan = re.match(r"scan of 40 clustered devices and 10 near no cluster: ([\d.]+) s CPU; "
                    r"a new such device joining: ([\d.]+) ms CPU$", lines[0])  # fmt: skip
    assert scan is not None
    modes = [re.search(r"secure_delete (\w+): 30 reports .* ([\d,]+) B a report held, "
                       r"([\d,]+) B dropped$", line) for line in lines[1:]]  # fmt: skip
    assert [m.group(1) for m in modes if m] == ["FAST", "ON"]
    for m in modes:
        held, dropped = (int(m.group(i).replace(",", "")) for i in (2, 3))
        assert 0 < dropped < held  # the arrays' pages went back to SQLite's free list
