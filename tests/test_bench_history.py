"""`python -m skipfleet.bench_history`: rounds through the real fleet state with history kept a
day and for good, and the figures it prints (small sizes: the figures, not the speed)."""

from __future__ import annotations

import re

from coordinator.config import DAY_S
from skipfleet.bench_history import KEPT_LONG_DAYS, main, run

ROUNDS = 10  # a day apart: past the 7 days of message ids seen, which history does not cover


def test_history_kept_a_day_holds_at_most_two_rounds_of_jobs_and_kept_for_good_every_round(
    tmp_path,
):
    pruned = run(20, ROUNDS, DAY_S, 1.0, tmp_path / "a-day")
    kept = run(20, ROUNDS, DAY_S, KEPT_LONG_DAYS, tmp_path / "for-good")
    jobs_a_round = kept["jobs"] // ROUNDS
    assert kept["jobs"] == ROUNDS * jobs_a_round > 0
    assert not any(p.total for _, p in kept["passes"])
    assert pruned["jobs"] <= 2 * jobs_a_round  # the last round and at most the one before
    assert sum(p.jobs for _, p in pruned["passes"]) == kept["jobs"] - pruned["jobs"]
    assert pruned["sizes"][-1] < kept["sizes"][-1]


def test_the_history_benchmark_prints_each_runs_sizes_passes_and_counts(capsys):
    assert main(["--devices", "10", "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    sizes = r"state file after each round \(MiB\): [\d.]+, [\d.]+, [\d.]+$"
    counts = r"jobs held at the end: [\d,]+; counting them by state: [\d.]+ µs CPU; a tick "
    assert len(re.findall(sizes, out, re.M)) == len(re.findall(counts, out)) == 2
    assert re.search(r"passes that deleted rows: \d+, [\d,]+ rows in all, [\d.]+ µs CPU a row", out)


def test_the_history_benchmark_times_a_tick_over_ended_rounds_written_directly(capsys):
    assert main(["--devices", "50", "--ended-rounds", "5"]) == 0
    line = capsys.readouterr().out.strip()
    found = re.fullmatch(r"a tick with no round and no scan, 5 ended rounds of 50 devices kept: "
                         r"([\d.]+) ms CPU", line)  # fmt: skip
    assert found is not None and float(found.group(1)) > 0
