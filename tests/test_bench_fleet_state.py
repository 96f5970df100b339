"""`python -m skipfleet.bench_fleet_state`: the scan, the joins, a whole round and the release
run through the fleet state's real steps and print their figures (small sizes: the figures,
not the speed)."""

from __future__ import annotations

import re

from skipfleet.bench_fleet_state import main


def test_the_fleet_state_benchmark_scans_joins_rounds_and_releases_and_prints_each_figure(
    capsys,
):
    args = ["--devices", "40", "--strangers", "10", "--reports", "30", "--round-devices", "20"]
    assert main(args) == 0  # a round that does not end on every device raises
    lines = capsys.readouterr().out.splitlines()
    scan = re.match(r"scan of 40 clustered devices and 10 near no cluster: ([\d.]+) s CPU; "
                    r"a new such device joining: ([\d.]+) ms CPU$", lines[0])  # fmt: skip
    assert scan is not None
    a_round = re.match(r"a round over 20 devices, the fleet state's CPU a device: ingest "
                       r"([\d.]+) ms \+ ticks ([\d.]+) ms = ([\d.]+) ms; "
                       r"([\d.]+) SQL statements a device$", lines[1])  # fmt: skip
    assert a_round is not None and float(a_round.group(3)) > 0 and float(a_round.group(4)) > 0
    modes = [re.search(r"secure_delete (\w+): 30 reports .* ([\d,]+) B a report held, "
                       r"([\d,]+) B dropped; its round's arrays file ([\d,]+) B a report$", line)
             for line in lines[2:]]  # fmt: skip
    assert [m.group(1) for m in modes if m] == ["FAST", "ON"]
    for m in modes:
        held, dropped, in_file = (int(m.group(i).replace(",", "")) for i in (2, 3, 4))
        assert 0 < dropped <= held < in_file  # the arrays went to their round's file, not rows
