"""`skipfleet bench agent`'s spool figure: the bytes the agent's own spool writes for a report
spooled and acknowledged, against Debian's SQLite default (secure_delete ON)."""

from __future__ import annotations

from skipfleet.bench_agent import spool_bytes_written


def test_the_agents_spool_writes_a_third_less_than_debians_default_for_a_cnn_report():
    """With ON, an acknowledged report's freed overflow pages are written again as zeros; the
    spool's own setting (FAST) does not (bytes passed to write(): the WAL and its checkpoints)."""
    own = spool_bytes_written(52_634, None, reports=30)
    on = spool_bytes_written(52_634, "ON", reports=30)
    assert own < 0.75 * on, (own, on)
