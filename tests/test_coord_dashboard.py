"""The dashboard's backend: its history of each device's readings, its timeline, and the routes
that serve the page, its scripts (Chart.js vendored, never a CDN) and its state, over an
in-process fleet state (no Ray)."""

from __future__ import annotations

import json

import pytest

from coordinator.api import FleetApi, Raw
from coordinator.clock import ManualClock
from coordinator.dashboard import (
    STATIC_DIR,
    Dashboard,
    FleetHistory,
    read_fleet_events,
    rollouts,
    timeline,
)
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from skipfleet.fleet.runstate import log_event
from tests.coord_fleet_helpers import SimDevice, make_config


def reading(t: float, **fields) -> dict:
    return {"device_id": "pi-1", "online": True, "last_heartbeat_at": t, **fields}


def test_history_keeps_one_point_per_heartbeat_and_evaluation_and_logs_online_changes():
    history = FleetHistory(points=3)
    history.record([reading(10.0, confidence_score=0.5, power_w=1.2, spool_depth=0)], 10.0)
    history.record([reading(10.0, confidence_score=0.5, power_w=1.2, spool_depth=0)], 11.0)
    history.record([reading(12.0, confidence_score=2.5, power_w=3.0, spool_depth=4,
                            accuracy=0.75, accuracy_at=11.5)], 12.0)  # fmt: skip
    history.record([reading(12.0, online=False, presence_since=13.0)], 14.0)
    for t in (15.0, 16.0, 17.0):
        history.record([reading(t, confidence_score=t)], t)
    series = history.series()["pi-1"]
    assert series["accuracy"] == [(11.5, 0.75)]
    assert series["power"] == [(10.0, 1.2), (12.0, 3.0)]
    assert series["spool"] == [(10.0, 0), (12.0, 4)]
    assert series["drift"] == [(15.0, 15.0), (16.0, 16.0), (17.0, 17.0)]  # bounded: the newest
    events = history.events()
    assert [(e["t"], e["text"]) for e in events] == [(13.0, "pi-1 offline"), (15.0, "pi-1 online")]


def test_a_long_history_is_thinned_to_a_charts_width_keeping_the_newest_point():
    history = FleetHistory(points=100, shown=10)
    for t in range(100):
        history.record([reading(float(t), power_w=float(t))], float(t))
    power = history.series()["pi-1"]["power"]
    assert len(power) == 10 and power[-1] == (99.0, 99.0)
    assert [t for t, _ in power] == sorted({t for t, _ in power})  # in order, no repeats


def test_a_large_fleet_keeps_fewer_points_a_device_but_never_fewer_than_a_chart_shows():
    history = FleetHistory(points=100, shown=5, fleet_points=4 * 3 * 20)  # 4 series, 3 devices
    for t in range(50):
        beats = [reading(float(t), power_w=float(t)) | {"device_id": f"pi-{i}"} for i in range(3)]
        history.record(beats, float(t))
    assert history.kept == 20
    assert history.series()["pi-2"]["power"][-1] == (49.0, 49.0)
    assert history.series()["pi-0"]["power"][0][0] >= 30.0  # of the newest 20 only
    crowded = FleetHistory(points=100, shown=5, fleet_points=10)
    crowded.record([reading(1.0, power_w=1.0)], 1.0)
    assert crowded.kept == 5  # a chart's width, whatever the fleet


def test_faults_logged_by_the_fleet_control_endpoint_reach_the_timeline(tmp_path):
    log_event(tmp_path, "pause", "pi-2")
    log_event(tmp_path, "cut-broker", None)
    with open(tmp_path / "events.jsonl", "a") as out:
        out.write('{"at": 1')  # a line being written is skipped, not an error
    events = read_fleet_events(tmp_path / "events.jsonl")
    assert [e["text"] for e in events] == ["fault: pause pi-2", "fault: cut-broker the broker"]
    assert read_fleet_events(tmp_path / "absent.jsonl") == []


def test_entries_of_the_events_file_that_are_not_faults_are_skipped(tmp_path):
    """Each of these made every /dashboard/state answer a 500 (KeyError, or a sort of str/float)."""
    with open(tmp_path / "events.jsonl", "w") as out:
        for line in ('[1, 2]', '{"at": 5.0}', '{"at": "soon", "action": "pause"}', "7",
                     '{"at": 6.0, "action": "pause", "device": ["pi-1"]}'):  # fmt: skip
            out.write(line + "\n")
    log_event(tmp_path, "pause", "pi-2")
    events = read_fleet_events(tmp_path / "events.jsonl")
    assert [e["text"] for e in events] == ["fault: pause pi-2"]


ROLLOUT = {
    "rollout_id": "r1", "cohort": "fan", "cluster": "c1", "candidate_version": 5,
    "previous_version": None, "canary_devices": ["pi-1", "pi-2"], "started_at": 20.0,
    "deadline": 99.0, "state": "ROLLED_BACK", "decided_at": 25.0,
    "reason": "pi-2 regressed by 0.20",
    "results": {"pi-1": {"device_id": "pi-1", "accuracy_candidate": 0.9,
                         "accuracy_current": 0.8, "failure": None},
                "pi-2": {"device_id": "pi-2", "accuracy_candidate": 0.6,
                         "accuracy_current": 0.8, "failure": None}},
}  # fmt: skip


def test_canaries_show_each_devices_candidate_and_current_accuracy_and_the_decision():
    (r,) = rollouts([{"cohort": "fan", "rollouts": [ROLLOUT]}])
    assert r["state"] == "ROLLED_BACK" and r["reason"] == "pi-2 regressed by 0.20"
    assert r["canaries"] == [
        {"device": "pi-1", "candidate": 0.9, "current": 0.8, "failure": None},
        {"device": "pi-2", "candidate": 0.6, "current": 0.8, "failure": None},
    ]
    runs = [{"run_id": "abcdef0123", "trigger": "request", "started_at": 1.0,
             "finished_at": 30.0, "state": "DONE"}]  # fmt: skip
    rounds = [{"round_id": "0123456789", "started_at": 2.0, "finished_at": 9.0,
               "stage": "FAILED", "failures": {"pi-2": "timed out"}}]  # fmt: skip
    fault = [{"t": 21.0, "kind": "fault", "text": "fault: kill pi-2"}]
    events = timeline(runs, rounds, [r], fault)
    assert [(e["t"], e["kind"]) for e in events] == [
        (1.0, "run"), (2.0, "round"), (9.0, "round"), (20.0, "canary"), (21.0, "fault"),
        (25.0, "rollback"), (30.0, "run"),
    ]  # fmt: skip
    assert events[2]["text"] == "round 01234567 failed, 1 device(s) failed"
    assert events[3]["text"] == "canary of v5 (fan/c1) on pi-1, pi-2"


@pytest.fixture
def api(tmp_path):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in ("pi-1", "pi-2")]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    port = LocalFleetPort(service)
    log_event(tmp_path, "kill", "pi-2")
    yield FleetApi(port, dashboard=Dashboard(port.read, FleetHistory(), tmp_path / "events.jsonl"))
    service.close()


def test_the_state_route_carries_devices_history_and_the_injected_fault(api):
    status, state = api.handle("GET", "/dashboard/state")
    assert status == 200
    assert sorted(d["device_id"] for d in state["devices"]) == ["pi-1", "pi-2"]
    assert set(state["history"]) == {"pi-1", "pi-2"}
    assert state["history"]["pi-1"]["power"], "a heartbeat's power is on the chart at once"
    assert [e["text"] for e in state["events"] if e["kind"] == "fault"] == ["fault: kill pi-2"]
    json.dumps(state)  # plain JSON


def test_the_page_loads_only_files_the_coordinator_serves_itself(api):
    status, page = api.handle("GET", "/dashboard/")
    assert status == 200 and isinstance(page, Raw) and page.content_type.startswith("text/html")
    html = page.data.decode()
    scripts = [s.split('"')[0] for s in html.split('<script src="')[1:]]
    assert scripts == ["/dashboard/static/chart.umd.min.js", "/dashboard/static/charts.js",
                       "/dashboard/static/dashboard.js"]  # fmt: skip
    assert "http://" not in html and "https://" not in html  # no CDN
    for src in scripts:
        status, body = api.handle("GET", src)
        assert status == 200 and body.content_type.startswith("text/javascript") and body.data
    assert (STATIC_DIR / "vendor" / "chart.js-LICENSE.md").read_text().startswith("The MIT")
    assert api.handle("GET", "/dashboard/static/..")[0] == 404
    assert api.handle("GET", "/dashboard/static/nothing.js")[0] == 404
    assert api.handle("GET", "/dashboard/static/vendor/chart.umd.min.js")[0] == 404  # one segment


def test_the_sampler_reads_only_the_devices_that_changed_since_its_last_sample(tmp_path):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in ("pi-1", "pi-2", "pi-3")]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    reads = []

    def read(view, *args):
        answer = LocalFleetPort(service).read(view, *args)
        reads.append((view, [d["device_id"] for d in answer["devices"]]))
        return answer

    history = FleetHistory()
    dashboard = Dashboard(read, history)
    dashboard.sample()
    clock.advance(5.0)
    service.ingest([devices[1].heartbeat()])
    dashboard.sample()
    dashboard.sample()
    assert reads == [
        ("device_readings", ["pi-1", "pi-2", "pi-3"]),
        ("device_readings", ["pi-2"]),
        ("device_readings", []),
    ]
    assert (
        len(history.series()["pi-2"]["power"]) == 2 and len(history.series()["pi-1"]["power"]) == 1
    )
    restarted = FleetService(make_config(tmp_path), clock=clock)  # after the actor restarted
    service.close()
    service = restarted
    dashboard.sample()  # its versions start again under another name: every device once more
    assert reads[-1] == ("device_readings", ["pi-1", "pi-2", "pi-3"])
    service.close()


def test_partitions_readings_merge_with_each_partitions_version():
    from coordinator.partition_views import merge_view

    merged = merge_view(
        "device_readings",
        [],
        [{"since": {"p0": 4}, "devices": [{"device_id": "a"}]},
         {"since": {"p1": 9}, "devices": [{"device_id": "b"}]}],
    )  # fmt: skip
    assert merged == {
        "since": {"p0": 4, "p1": 9},
        "devices": [{"device_id": "a"}, {"device_id": "b"}],
    }


def test_a_reading_carries_every_field_the_history_records():
    from coordinator.dashboard import ACCURACY_READINGS, HEARTBEAT_SERIES
    from coordinator.views import READING_FIELDS

    used = {"device_id", "last_heartbeat_at", "online", "presence_since"}
    used |= set(HEARTBEAT_SERIES.values()) | {f for pair in ACCURACY_READINGS for f in pair}
    assert used == set(READING_FIELDS)
