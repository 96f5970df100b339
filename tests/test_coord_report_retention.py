"""A report's arrays are kept until its round ends, then dropped (coordinator.reports): the
state file no longer grows by every round's arrays, and the rows the device views list stay."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from coordinator import round_arrays
from coordinator.aggregation import AdapterShape
from coordinator.clock import ManualClock
from coordinator.observations import RoundFinished, RoundResult
from coordinator.pipeline import AGGREGATION_TIMEOUT_S
from coordinator.reports import arrays_blob
from coordinator.round_arrays import FOLDER, RoundArrayFiles, StorageFailed
from coordinator.service import SCAN_INTERVAL_S, FleetService
from coordinator.state_db import StateDB
from shared.protocol import JobKind, JobState
from tests.coord_fleet_helpers import (
    LostAggregations,
    SimDevice,
    finetune_jobs,
    jobs_in,
    make_config,
)
from tests.coord_helpers import random_factors
from tests.test_coord_service import answer_canaries, finetune_all, join

SECURE_DELETE_FAST = 2  # PRAGMA secure_delete's answer for FAST
# Reports large enough that their arrays, not the other tables, make the state file grow.
LARGE = AdapterShape(layer_dims=(1024, 64, 64), n_classes=3)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(tmp_path, clock, **policy) -> FleetService:
    return FleetService(make_config(tmp_path, **policy), clock=clock)


def stored_arrays(service: FleetService) -> dict[str, int]:
    """Reports a round has arrays stored for: in its file (where its row says), or in their
    rows as the last version kept them."""
    folder = service.fleet.config.state_dir / FOLDER
    rows = service.fleet.db.query(
        "SELECT round_id, arrays IS NOT NULL AS in_row, arrays_file, count(*) AS n "
        "FROM fit_reports WHERE arrays IS NOT NULL OR arrays_file IS NOT NULL GROUP BY 1, 2, 3"
    )
    counts: dict[str, int] = {}
    for r in rows:
        if r["in_row"] or (folder / r["arrays_file"]).exists():
            counts[r["round_id"]] = counts.get(r["round_id"], 0) + r["n"]
    return counts


def reports_listed(service: FleetService) -> int:
    return service.fleet.db.query_one("SELECT count(*) AS n FROM fit_reports")["n"]


def full_round(service: FleetService, devices: list[SimDevice], arrays=None) -> None:
    """Fine-tune, aggregate, canary, promote, apply: the cohort is ready for the next run."""
    by_name = {d.device_id: d for d in devices}
    service.ingest([d.heartbeat() for d in devices])
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick(), arrays=arrays)
    answer_canaries(service, devices, service.tick(), candidate=0.9, current=0.85)
    for device, job in jobs_in(service.tick(), JobKind.APPLY_ADAPTER):
        service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED)])


def test_a_stored_round_keeps_its_reports_rows_but_not_their_arrays(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    (round_id,) = stored_arrays(service)
    assert stored_arrays(service) == {round_id: 3}  # kept while the round runs
    service.tick()  # closes, aggregates and stores it
    assert service.rounds()[0]["stage"] == "STORED"
    assert stored_arrays(service) == {} and reports_listed(service) == 3
    assert [a["round_id"] for a in service.device_adapters("pi-1")] == [round_id]


def test_a_failed_round_drops_the_arrays_of_the_reports_it_had(tmp_path, clock):
    service = start(tmp_path, clock, round_deadline_s=50.0, min_completion_ratio=1.0)
    devices = join(service, clock, "pi-1", "pi-2")
    jobs = finetune_jobs(service)
    service.ingest(devices[0].finetune(jobs["pi-1"].job_id))
    assert sum(stored_arrays(service).values()) == 1
    clock.advance(51.0)
    service.tick()
    assert service.rounds()[0]["stage"] == "FAILED"
    assert stored_arrays(service) == {} and reports_listed(service) == 1


def test_after_a_restart_a_scan_drops_the_arrays_an_earlier_version_kept_of_ended_rounds_only(
    tmp_path, clock
):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    ended = service.rounds()[0]["round_id"]
    jobs = finetune_jobs(service)
    service.ingest(devices[0].finetune(jobs["pi-1"].job_id))  # the running round's one report
    running = next(r["round_id"] for r in service.rounds() if r["stage"] == "RUNNING")
    # as an earlier version left them: the ended round's arrays still in their rows
    blob = arrays_blob(random_factors(np.random.default_rng(0)))
    service.fleet.db.execute(
        "UPDATE fit_reports SET arrays = ?, arrays_file = NULL, arrays_at = NULL, "
        "arrays_len = NULL WHERE round_id = ?",
        (blob, ended),
    )
    assert stored_arrays(service) == {ended: 2, running: 1}
    service.close()

    restarted = start(tmp_path, clock)
    assert stored_arrays(restarted) == {ended: 2, running: 1}  # not at start-up
    clock.advance(SCAN_INTERVAL_S)
    restarted.tick()  # a scan drops one ended round's arrays
    assert stored_arrays(restarted) == {running: 1}
    restarted.ingest(devices[1].finetune(jobs["pi-2"].job_id))
    restarted.tick()  # the running round reads its kept report back from its file
    stages = {r["round_id"]: r for r in restarted.rounds()}
    assert stages[running]["stage"] == "STORED" and stages[running]["failures"] == {}
    assert stored_arrays(restarted) == {}


def test_a_report_leaves_its_row_in_the_state_file_not_its_arrays_once_its_round_ends(
    tmp_path, clock
):
    """Kept, every round's arrays stayed in the state file for good; dropped, their pages are
    reused and a report adds its row's columns alone (about a page's remainder of the row)."""
    service = start(tmp_path, clock, max_concurrent_jobs=20)  # one tick sends every job
    devices = join(service, clock, *(f"pi-{i}" for i in range(20)))
    arrays = random_factors(np.random.default_rng(1), shape=LARGE)
    blob_bytes = len(arrays_blob(arrays))

    def report_table_bytes() -> int:  # the table and its indexes (SQLite's dbstat)
        row = service.fleet.db.query_one(
            "SELECT sum(pgsize) FROM dbstat WHERE name LIKE '%fit_reports%'"
        )
        return row[0]

    for _ in range(2):
        full_round(service, devices, arrays)
    after_two = report_table_bytes()
    for _ in range(3):
        full_round(service, devices, arrays)
    assert [r["stage"] for r in service.rounds()] == ["STORED"] * 5
    assert reports_listed(service) == 5 * len(devices)
    per_report = (report_table_bytes() - after_two) / (3 * len(devices))
    assert per_report < blob_bytes / 4


def test_the_state_db_does_not_write_the_pages_a_delete_frees(tmp_path):
    """secure_delete FAST, not the ON Debian's SQLite defaults to (a write of zeros for every
    page a release frees), on every connection the state db opens, its read threads' too."""
    db = StateDB(tmp_path / "s.sqlite3")
    modes = []
    reader = threading.Thread(target=lambda: modes.append(db.query_one("PRAGMA secure_delete")[0]))
    reader.start()
    reader.join()
    assert [db.query_one("PRAGMA secure_delete")[0], *modes] == [SECURE_DELETE_FAST] * 2


def test_a_report_that_comes_after_its_round_ended_is_dropped_by_the_next_scan(tmp_path, clock):
    service = start(tmp_path, clock)
    pi1, pi2 = join(service, clock, "pi-1", "pi-2")
    jobs = finetune_jobs(service)
    service.ingest(pi1.finetune(jobs["pi-1"].job_id))
    service.ingest([pi2.status(jobs["pi-2"].job_id, JobState.SUCCEEDED)])  # its report, later
    service.tick()
    (record,) = service.rounds()
    assert record["stage"] == "STORED" and "pi-2" in record["failures"]
    service.ingest([pi2.report(jobs["pi-2"].job_id)])
    assert stored_arrays(service) == {record["round_id"]: 1}
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert stored_arrays(service) == {} and reports_listed(service) == 2


def test_a_round_whose_aggregation_is_lost_fails_at_the_timeout_and_drops_its_arrays(
    tmp_path, clock
):
    service = FleetService(make_config(tmp_path), aggregator=LostAggregations(), clock=clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    service.tick()
    assert service.rounds()[0]["stage"] == "AGGREGATING" and sum(stored_arrays(service).values())
    clock.advance(AGGREGATION_TIMEOUT_S + 1)
    service.tick()
    (record,) = service.rounds()
    assert record["stage"] == "FAILED" and "did not finish" in record["error"]
    assert stored_arrays(service) == {}
    finished = [e for e in service.metrics_report().events if isinstance(e, RoundFinished)]
    assert [e.result for e in finished] == [RoundResult.FAILED]


def test_a_report_whose_arrays_cannot_be_written_fails_its_batch_whole_until_they_can(
    tmp_path, clock, monkeypatch
):
    """A full disk must not cost the report: the batch raises (the bridge acknowledges nothing
    and hands it again), and nothing of it is applied; the same batch later applies."""
    service = start(tmp_path, clock)
    pi1, pi2 = join(service, clock, "pi-1", "pi-2")
    jobs = finetune_jobs(service)
    batch = [pi2.heartbeat(), *pi1.finetune(jobs["pi-1"].job_id)]

    def disk_full(self, round_id, blob):
        raise StorageFailed("cannot write round-arrays/x: [Errno 28] No space left on device")

    monkeypatch.setattr(RoundArrayFiles, "append", disk_full)
    with pytest.raises(StorageFailed):
        service.ingest(batch)
    assert reports_listed(service) == 0 and stored_arrays(service) == {}
    assert {j["state"] for j in service.jobs()} == {"QUEUED"}  # the statuses rolled back too
    monkeypatch.undo()
    assert service.ingest(batch) == len(batch)
    assert reports_listed(service) == 1 and sum(stored_arrays(service).values()) == 1


def test_each_scan_and_a_stop_sync_the_arrays_written_since(tmp_path, clock, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(round_arrays.os, "fdatasync", synced.append)
    service = start(tmp_path, clock)
    pi1, pi2 = join(service, clock, "pi-1", "pi-2")
    jobs = finetune_jobs(service)
    service.ingest(pi1.finetune(jobs["pi-1"].job_id))
    assert synced == []  # not at each commit
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert len(synced) == 1
    service.ingest(pi2.finetune(jobs["pi-2"].job_id))
    service.close()
    assert len(synced) == 2


def test_a_scan_removes_the_files_of_rounds_the_state_db_never_had(tmp_path, clock):
    """A state db replaced or restored from an older copy leaves files no round will end."""
    service = start(tmp_path, clock)
    pi1, _ = join(service, clock, "pi-1", "pi-2")
    jobs = finetune_jobs(service)
    service.ingest(pi1.finetune(jobs["pi-1"].job_id))
    running = next(r["round_id"] for r in service.rounds() if r["stage"] == "RUNNING")
    orphan = service.fleet.config.state_dir / FOLDER / f"{b'gone'.hex()}.0123abcd.arrays"
    orphan.write_bytes(b"a report of a round this state db never had")
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert not orphan.exists() and stored_arrays(service) == {running: 1}
