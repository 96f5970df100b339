"""A partitioned coordinator's plain parts: cohort -> partition, each partition's config, the
ingest's routing, the state dir's layout check, and the merged views (no Ray, no broker)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from coordinator.clock import ManualClock
from coordinator.config import ConfigError
from coordinator.observations import DeviceGauges, FleetSnapshot, MessageRejected, MetricsReport
from coordinator.partition_runtime import PartitionIngestPort, RelayMetrics
from coordinator.partition_views import (
    PartitionReport,
    merge_health,
    merge_reports,
    merge_view,
)
from coordinator.partitions import (
    DeviceDirectory,
    LayoutMismatch,
    check_layout,
    partition_config,
    partition_of,
    presence_cohort,
)
from coordinator.scheduler import REPORT_GRACE_S
from coordinator.service import FleetService
from coordinator.state_db import DB_FILENAME
from shared.mqtt import MqttProtocol
from shared.protocol import JobKind, JobState
from shared.topics import Topics
from tests.coord_fleet_helpers import SimDevice, jobs_in, make_config

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def cohorts_in_each_partition(partitions: int) -> dict[int, str]:
    """A device cohort name (the agent's --cohort) for each partition (SimDevice's base)."""
    found: dict[int, str] = {}
    for name in (f"task{n}" for n in range(200)):
        presence = SimDevice("d", ManualClock(0.0), cohort=name).presence().envelope.message
        found.setdefault(partition_of(presence_cohort(presence), partitions), name)
        if len(found) == partitions:
            return found
    raise AssertionError("200 cohorts never covered every partition")


def test_a_cohort_has_the_same_partition_in_every_process():
    cohorts = [f"fan-{i}-sha256:{i:064x}" for i in range(50)]
    here = [partition_of(c, 4) for c in cohorts]
    script = (
        "import json, sys; from coordinator.partitions import partition_of; "
        f"print(json.dumps([partition_of(c, 4) for c in {cohorts!r}]))"
    )
    for seed in ("1", "2"):  # Python's own hash() would differ between these
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True, text=True, check=True, cwd=REPO_ROOT,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": REPO_ROOT},
        )  # fmt: skip
        assert json.loads(out.stdout) == here
    assert set(here) == {0, 1, 2, 3}  # 50 cohorts land in every one of 4 partitions
    assert {partition_of(c, 1) for c in cohorts} == {0}


def test_each_partition_has_its_own_state_dir_client_id_and_actor(tmp_path):
    config = dataclasses.replace(make_config(tmp_path / "coord"), partitions=3)
    parts = [partition_config(config, i) for i in range(3)]
    assert {p.state_dir for p in parts} == {
        tmp_path / "coord" / "partitions" / f"p{i}" for i in range(3)
    }
    assert len({p.client_id for p in parts} | {config.client_id}) == 4
    assert len({p.fleet_actor_name for p in parts}) == 3
    # the instance (and so the share group) is the coordinator's, not derived from each dir
    assert {p.instance_name for p in parts} == {config.instance_name}
    assert {p.share_group for p in parts} == {f"skipfleet-{config.instance_name}"}
    assert {p.token_path for p in parts} == {config.token_path}


def test_one_partition_subscribes_as_before_and_several_share_all_but_status(tmp_path):
    single = make_config(tmp_path / "a")
    topics = Topics("fleet")
    assert single.share_group is None
    assert topics.coordinator_subscriptions(single.share_group) == [
        ("fleet/+/status", 1), ("fleet/+/telemetry", 0), ("fleet/+/job", 1),
        ("fleet/+/report", 1), ("fleet/+/fetch", 1),
    ]  # fmt: skip
    shared = dataclasses.replace(single, partitions=2, instance="east")
    assert topics.coordinator_subscriptions(shared.share_group) == [
        ("fleet/+/status", 1),  # whole: retained presences are how every ingest learns cohorts
        ("$share/skipfleet-east/fleet/+/telemetry", 0),
        ("$share/skipfleet-east/fleet/+/job", 1),
        ("$share/skipfleet-east/fleet/+/report", 1),
        ("$share/skipfleet-east/fleet/+/fetch", 1),
    ]


def test_partitions_need_mqtt_5_and_one_resource_each(tmp_path):
    config = make_config(tmp_path / "a")
    v311 = dataclasses.replace(config.mqtt, protocol=MqttProtocol.V311)
    with pytest.raises(ConfigError, match="MQTT 5 shared subscriptions"):
        dataclasses.replace(config, partitions=2, mqtt=v311)
    dataclasses.replace(config, mqtt=v311)  # one partition: no shared subscription, v3.1.1 is fine
    with pytest.raises(ConfigError, match="one per partition"):
        dataclasses.replace(config, partitions=2, partition_resources=("node_a",))
    with pytest.raises(ConfigError, match="--partitions must be"):
        dataclasses.replace(config, partitions=0)


def test_the_ingest_applies_its_own_forwards_others_and_holds_back_the_unplaced():
    mine, theirs = cohorts_in_each_partition(2)[0], cohorts_in_each_partition(2)[1]
    clock = ManualClock(100.0)
    a, b, new = (
        SimDevice(d, clock, cohort=c) for d, c in (("a", mine), ("b", theirs), ("n", mine))
    )
    directory = DeviceDirectory(me=0, partitions=2)
    routed = directory.route([a.presence(), b.presence(), a.heartbeat(), b.heartbeat(),
                              new.heartbeat(), new.status("j1", JobState.SUCCEEDED)])  # fmt: skip
    assert [r.device_id for r in routed.local] == ["a", "a"]
    # b's presence reaches b's own partition through its ingest's whole `status` subscription
    assert routed.learned_only == 1
    assert {p: [r.envelope.kind.value for r in rs] for p, rs in routed.remote.items()} == {
        1: ["heartbeat"]
    }
    assert [r.device_id for r in routed.unplaced] == ["n", "n"]
    assert (directory.owner("a"), directory.owner("b"), directory.owner("n")) == (0, 1, None)
    # the registries say where n is: its waiting messages go there, in order
    still = directory.place_unplaced(routed, {"n": 1})
    assert still == [] and [r.envelope.kind.value for r in routed.remote[1]] == [
        "heartbeat", "heartbeat", "job_status"
    ]  # fmt: skip
    assert directory.place_unplaced(directory.route([SimDevice("z", clock).heartbeat()]), {})


def test_a_device_unplaced_in_a_batch_keeps_its_later_messages_behind_it():
    directory = DeviceDirectory(me=0, partitions=2)
    clock = ManualClock(1.0)
    late = SimDevice("late", clock, cohort=cohorts_in_each_partition(2)[1])
    routed = directory.route([late.heartbeat(), late.presence(), late.heartbeat()])
    # its presence placed it mid-batch, but the heartbeat after must not overtake the one before
    assert [r.envelope.kind.value for r in routed.unplaced] == ["heartbeat", "heartbeat"]
    assert routed.learned_only == 1 and directory.owner("late") == 1


def test_a_state_dir_keeps_its_partition_count(tmp_path):
    config = make_config(tmp_path / "coord")
    check_layout(config)  # a fresh dir, one partition: nothing to record
    two = dataclasses.replace(config, partitions=2)
    check_layout(two)
    check_layout(two)  # the same count again
    with pytest.raises(LayoutMismatch, match="split into 2 partition"):
        check_layout(dataclasses.replace(config, partitions=3))
    with pytest.raises(LayoutMismatch, match="--partitions 2"):
        check_layout(config)
    single = make_config(tmp_path / "single")
    single.state_dir.mkdir()
    (single.state_dir / DB_FILENAME).write_bytes(b"")
    with pytest.raises(LayoutMismatch, match="split into 1 partition"):
        check_layout(dataclasses.replace(single, partitions=2))


def test_list_views_merge_like_one_actor_would():
    jobs = [[{"job_id": "a", "created_at": 3.0}, {"job_id": "b", "created_at": 1.0}],
            [{"job_id": "c", "created_at": 2.0}]]  # fmt: skip
    assert [j["job_id"] for j in merge_view("jobs", (2, None), jobs)] == ["a", "c"]
    devices = [[{"device_id": "d2"}], [{"device_id": "d1"}, {"device_id": "d3"}]]
    assert [d["device_id"] for d in merge_view("devices", (), devices)] == ["d1", "d2", "d3"]
    rounds = [[{"round_id": "r1", "started_at": 1.0}], [{"round_id": "r2", "started_at": 5.0}]]
    assert [r["round_id"] for r in merge_view("rounds", (50,), rounds)] == ["r2", "r1"]
    with pytest.raises(ValueError, match="not merged"):
        merge_view("device", ("d1",), [])


def test_health_and_metrics_add_up_over_partitions():
    def health(p: int, devices: int, stuck: list) -> dict:
        names = ("online", "active_jobs", "open_rounds", "aggregating_rounds", "active_runs",
                 "dropped_metric_events", "outbox_backlog")  # fmt: skip
        counts = dict.fromkeys(names, p)
        return {"status": "ok", "started_at": 10.0 + p, "devices": devices, "stuck": stuck,
                "partition": p, "pid": 100 + p, "node_id": f"n{p}", "mqtt_connected": True,
                "received": {}, "resources": {}, **counts}  # fmt: skip

    merged = merge_health([health(0, 3, []), health(1, 4, [{"kind": "round", "id": "r"}])])
    assert merged["devices"] == 7 and merged["online"] == 1 and merged["started_at"] == 10.0
    assert merged["stuck"] == [{"kind": "round", "id": "r"}]
    assert [p["node_id"] for p in merged["partitions"]] == ["n0", "n1"]

    def report(device: str, cohort: str, state_count: int) -> PartitionReport:
        snapshot = FleetSnapshot(
            devices=(DeviceGauges(device, online=True),), jobs_by_state={"QUEUED": state_count},
            adapter_versions={cohort: 1}, cohort_devices={cohort: 1},
        )  # fmt: skip
        return PartitionReport(MetricsReport((), snapshot), {"job_status": (2, 100)}, {"job": 1})

    total = merge_reports([report("d1", "c1", 2), report("d2", "c2", 3)])
    assert [d.device_id for d in total.report.snapshot.devices] == ["d1", "d2"]
    assert total.report.snapshot.jobs_by_state == {"QUEUED": 5}
    assert total.report.snapshot.adapter_versions == {"c1": 1, "c2": 1}
    assert total.received == {"job_status": (4, 200)} and total.sent == {"job": 2}


def started_round(tmp_path, partitions: int) -> tuple[FleetService, ManualClock, list, dict]:
    clock = ManualClock(1000.0)
    config = dataclasses.replace(make_config(tmp_path / "p"), partitions=partitions)
    service = FleetService(config, clock=clock)
    devices = [SimDevice(name, clock) for name in ("pi-1", "pi-2")]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    service.request_finetune(all_=True)
    jobs = {device: job.job_id for device, job in jobs_in(service.tick(), JobKind.FINETUNE)}
    first, second = devices
    service.ingest(first.finetune(jobs["pi-1"]))
    # pi-2's job ends before its report arrives: the two went through different ingests
    service.ingest([second.status(jobs["pi-2"], JobState.SUCCEEDED)])
    return service, clock, devices, jobs


def test_a_partitions_round_waits_for_a_report_its_jobs_end_overtook(tmp_path):
    service, clock, (_, second), jobs = started_round(tmp_path, partitions=2)
    service.tick()
    assert service.rounds()[0]["stage"] == "RUNNING"
    clock.advance(1.0)
    service.ingest([second.report(jobs["pi-2"])])
    service.tick()
    (stored,) = service.rounds()
    assert stored["stage"] == "STORED" and sorted(stored["weights"]) == ["pi-1", "pi-2"]


def test_a_report_that_never_comes_holds_the_round_only_for_the_grace(tmp_path):
    service, clock, _, _ = started_round(tmp_path, partitions=2)
    clock.advance(REPORT_GRACE_S - 1)
    service.tick()
    assert service.rounds()[0]["stage"] == "RUNNING"
    clock.advance(2)
    service.tick()
    (stored,) = service.rounds()
    assert stored["stage"] == "STORED" and sorted(stored["weights"]) == ["pi-1"]


def test_one_partition_closes_the_round_without_waiting_as_before(tmp_path):
    service, _, _, _ = started_round(tmp_path, partitions=1)
    service.tick()
    assert service.rounds()[0]["stage"] == "STORED"


class FakeCall:
    """An actor method's `.remote` standing in for Ray: runs at once, the result is the ref."""

    def __init__(self, fn) -> None:
        self.remote = fn


class FakePeer:
    def __init__(self, known: list[str]) -> None:
        self.batches: list[list] = []
        self.ingest = FakeCall(lambda batch: self.batches.append(batch) or len(batch))
        self.registered = FakeCall(lambda devices: [d for d in devices if d in known])


class FakePeers:
    def __init__(self, peer: FakePeer) -> None:
        self.me, self._peer = 0, peer

    def get(self, index: int) -> FakePeer:
        assert index == 1
        return self._peer

    def others(self) -> list[int]:
        return [1]

    def wait(self, refs):
        return list(refs)


def test_a_partitions_ingest_applies_its_own_forwards_the_rest_and_drops_unplaced_beats(tmp_path):

    mine, theirs = cohorts_in_each_partition(2)[0], cohorts_in_each_partition(2)[1]
    clock = ManualClock(100.0)
    service = FleetService(
        dataclasses.replace(make_config(tmp_path / "p0"), partitions=2), clock=clock
    )
    peer, relay = FakePeer(known=["known-elsewhere"]), RelayMetrics()
    port = PartitionIngestPort(service, threading.RLock(), FakePeers(peer), relay)
    own, other = SimDevice("own", clock, cohort=mine), SimDevice("other", clock, cohort=theirs)
    elsewhere, stranger = SimDevice("known-elsewhere", clock), SimDevice("stranger", clock)
    port.ingest([own.presence(), other.presence(), own.heartbeat(), other.heartbeat(),
                 elsewhere.heartbeat(), stranger.heartbeat(),
                 stranger.status("no-such-job", JobState.SUCCEEDED)])  # fmt: skip
    assert [d["device_id"] for d in service.devices()] == ["own"]
    (forwarded,) = peer.batches
    assert [(r.device_id, r.envelope.kind.value) for r in forwarded] == [
        ("other", "heartbeat"), ("known-elsewhere", "heartbeat")
    ]  # fmt: skip
    report = relay.take().report
    reasons = [e.reason for e in report.events if isinstance(e, MessageRejected)]
    assert reasons == ["unplaced"]  # the stranger's heartbeat
    # its job status was applied here and refused, as one coordinator refuses a stranger's
    drained = [e.reason for e in service.metrics_report().events if isinstance(e, MessageRejected)]
    assert drained == ["unknown_job"]
    assert "stranger" not in {d["device_id"] for d in service.devices()}
