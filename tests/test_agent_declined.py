"""The memory of declined versions: per running adapter, bounded, persisted, survives a bad file."""

from __future__ import annotations

import logging

from agent.declined import LIMIT, DeclinedVersions


def test_a_decline_holds_for_the_adapter_that_ran_and_survives_a_restart(tmp_path):
    memory = DeclinedVersions(tmp_path / "declined.json")
    memory.add(7, "slot-a", 0.80, 0.90)
    again = DeclinedVersions(tmp_path / "declined.json")
    assert again.has(7, "slot-a")
    assert not again.has(7, "slot-b") and not again.has(8, "slot-a")


def test_only_the_latest_declines_are_kept(tmp_path):
    memory = DeclinedVersions(tmp_path / "declined.json")
    for version in range(LIMIT + 5):
        memory.add(version, "base", 0.5, 0.6)
    memory.add(LIMIT + 1, "base", 0.5, 0.6)  # again: one entry, moved to the end
    reopened = DeclinedVersions(tmp_path / "declined.json")
    kept = [v for v in range(LIMIT + 5) if reopened.has(v, "base")]
    assert len(kept) == LIMIT and kept == list(range(5, LIMIT + 5))


def test_an_unreadable_file_means_starting_afresh(tmp_path, caplog):
    path = tmp_path / "declined.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="agent.declined"):
        memory = DeclinedVersions(path)
    assert "starting afresh" in caplog.text and not memory.has(1, "base")
    memory.add(1, "base", 0.1, 0.2)  # and it writes a good one again
    assert DeclinedVersions(path).has(1, "base")
