"""`python -m skipfleet.bench_scrape`: both ways of writing the device series and both servers
are measured for each fleet size and printed (small sizes: the figures, not the speed)."""

from __future__ import annotations

import re

from skipfleet.bench_scrape import main

ROW = re.compile(r"^\s*([\d,]+)" + r"\s+([\d.]+)" * 6 + "$")


def test_the_scrape_benchmark_prints_a_row_of_figures_for_each_fleet_size(capsys):
    assert main(["--devices", "20,200", "--repeat", "1"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["devices", "prometheus_client", "s"]
    parsed = [ROW.match(row) for row in rows]
    assert all(parsed) and [m.group(1) for m in parsed] == ["20", "200"]
    small, large = ([float(m.group(i)) for i in range(2, 8)] for m in parsed)
    assert large[1] > 0 and large[3] > 0  # CPU measured (a small fleet's may round to 0.000)
    assert large[4] > 5 * small[4]  # the device text grows with the fleet
    assert large[5] < large[4]  # and is gzipped smaller
