"""The coordinator asks again for its open jobs (coordinator.reask): when a device comes online,
and when its own MQTT session was lost; each job's command is kept until its deadline. No
broker here (tests/test_reask_broker.py has the real mosquitto killed mid-round)."""

from __future__ import annotations

import dataclasses

import pytest
from paho.mqtt.client import ConnectFlags

from coordinator.bridge import MqttBridge
from coordinator.clock import ManualClock
from coordinator.metrics import FleetMetrics
from coordinator.observations import FinetuneReported
from coordinator.outbound import desired
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.protocol import DesiredState, Job, JobKind, decode
from tests.coord_fleet_helpers import BASE_HASH, SimDevice, jobs_in, make_config
from tests.test_coord_bridge import RESUMED, FakeClient, connack, wait_for


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def dispatched(service: FleetService, clock: ManualClock, *names: str):
    """Devices online, a round started, its jobs handed out and acknowledged by the broker."""
    devices = {name: SimDevice(name, clock) for name in names}
    service.ingest([m for d in devices.values() for m in (d.presence(), d.heartbeat())])
    service.request_finetune(all_=True)
    handed = service.tick()
    jobs = dict(jobs_in(handed, JobKind.FINETUNE))
    assert sorted(jobs) == sorted(names)
    assert service.tick([o.seq for o in handed]) == []  # acknowledged: out of the outbox
    return devices, jobs


def test_a_device_coming_online_is_sent_its_open_jobs_command_again(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    service.ingest([devices["pi-1"].presence()])  # a new connection of pi-1
    (again,) = jobs_in(service.tick(), JobKind.FINETUNE)
    assert again == ("pi-1", jobs["pi-1"])  # the same command: id, parameters, expiry


def test_a_repeated_presence_asks_nothing_and_a_finished_job_is_not_asked_again(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    online = devices["pi-1"].presence()
    service.ingest([online])
    service.tick()
    service.ingest([online])  # the same envelope again (a retained copy): not a new connection
    assert service.tick() == []
    service.ingest(devices["pi-2"].finetune(jobs["pi-2"].job_id))
    service.ingest([devices["pi-2"].presence()])
    assert jobs_in(service.tick(), JobKind.FINETUNE) == []


def test_a_lost_session_asks_every_open_job_again_also_after_a_restart(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2", "pi-3")
    service.ingest(devices["pi-3"].finetune(jobs["pi-3"].job_id))
    service.close()
    again = FleetService(make_config(tmp_path), clock=clock)  # the commands are in SQLite
    assert again.reask_open_jobs() == 2
    assert sorted(jobs_in(again.tick(), JobKind.FINETUNE)) == [
        ("pi-1", jobs["pi-1"]),
        ("pi-2", jobs["pi-2"]),
    ]


def test_a_command_is_kept_until_its_jobs_deadline_only(tmp_path, clock):
    service = FleetService(make_config(tmp_path, job_timeout_s=60.0), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1")
    old = jobs["pi-1"].job_id

    def kept() -> set[str]:
        return {r["job_id"] for r in service.fleet.db.query("SELECT job_id FROM job_commands")}

    assert kept() == {old}
    clock.advance(61.0)
    service.tick()  # times the job out (a retry and a cancel follow) and prunes its command
    assert old not in kept() and len(kept()) == 2
    service.ingest([devices["pi-1"].presence()])
    asked = {job.job_id for _, job in jobs_in(service.tick())}
    assert asked == kept()  # the retry and the cancel: open; the timed-out one is not


def test_a_result_sent_again_after_a_reask_is_applied_once(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    answer = devices["pi-1"].finetune(jobs["pi-1"].job_id)
    assert service.ingest(answer) == len(answer)
    service.ingest([devices["pi-1"].presence()])  # no open job: nothing asked
    assert service.ingest(answer) == 0  # the kept result, unchanged: every message a repeat
    events = service.metrics_report().events
    assert sum(isinstance(e, FinetuneReported) for e in events) == 1


# ---- the bridge: a CONNACK without a session


@pytest.fixture
def bridge(tmp_path, clock):
    config = dataclasses.replace(make_config(tmp_path), tick_interval_s=0.02)
    service = FleetService(config, clock=clock)
    clients: list[FakeClient] = []

    def factory(settings, client_id, manual_ack=False):
        clients.append(FakeClient(settings, client_id, manual_ack))
        return clients[-1]

    bridge = MqttBridge(config, LocalFleetPort(service), FleetMetrics(), client_factory=factory)
    bridge.start()
    yield clients[0], service
    bridge.stop()
    service.close()


def job_publishes(client: FakeClient) -> list[Job]:
    with client.lock:
        payloads = [p[1] for p in client.published if p[0].endswith("/cmd/job")]
    return [decode(payload).message for payload in payloads]


def test_a_connection_without_a_session_publishes_the_open_jobs_again(bridge, clock):
    client, service = bridge
    client.on_connect(client, None, RESUMED, connack(0), None)
    device = SimDevice("pi-1", clock)
    service.ingest([device.presence(), device.heartbeat()])
    service.request_finetune(all_=True)
    (job,) = wait_for(lambda: job_publishes(client))
    client.puback_all()
    client.on_connect(client, None, RESUMED, connack(0), None)  # the session was kept: nothing
    client.on_connect(client, None, ConnectFlags(session_present=False), connack(0), None)
    first, again = wait_for(lambda: job_publishes(client)[1:] and job_publishes(client))
    assert again == first == job
    wait_for(lambda: service.health()["outbox_backlog"] == 0 or client.puback_all())
    assert len(job_publishes(client)) == 2


# ---- an offer: the APPLY_ADAPTER job a retained pointer carries


def pointers(outbound) -> list[DesiredState]:
    return [o.message for o in outbound if isinstance(o.message, DesiredState)]


def acknowledged(service: FleetService) -> list[DesiredState]:
    """One tick's pointers; the broker acknowledges all it handed out (out of the outbox)."""
    handed = service.tick()
    service.tick([o.seq for o in handed])
    return pointers(handed)


def test_an_offer_is_asked_again_with_its_pointer_only_while_that_is_the_latest(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    device = SimDevice("pi-1", clock)
    service.ingest([device.presence(), device.heartbeat()])
    f = service.fleet
    with f.db.transaction():
        job = f.create_job("pi-1", JobKind.APPLY_ADAPTER.value, trigger="rollout")
        f.send_desired("pi-1", desired(3, BASE_HASH, "fan", only_if_better=True, offer=job))
    (sent,) = acknowledged(service)
    service.ingest([device.presence()])
    (again,) = acknowledged(service)
    assert again == sent and again.apply_job().job_id == job.job_id
    with f.db.transaction():  # a newer pointer, no offer: the device should keep this one
        f.send_desired("pi-1", desired(4, BASE_HASH, "fan"))
    acknowledged(service)
    service.ingest([device.presence()])
    assert acknowledged(service) == []  # the v3 pointer would put the old version back


def test_a_report_replayed_under_a_new_seq_is_not_applied_again(tmp_path, clock):
    """A device on a valid account sends its finished job's report again as a new message (a
    new seq passes the de-duplication): the fine-tune is not recorded again (its energy counted
    twice, its accuracy and 'runs its own adapter' put back over what happened since)."""
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    job_id = jobs["pi-1"].job_id
    service.ingest(devices["pi-1"].finetune(job_id, after=0.9))
    clock.advance(30.0)
    before = service.fleet.registry.get("pi-1")
    replay = devices["pi-1"].report(job_id, after=0.2)  # the same job id, a new (boot, seq)
    service.ingest([replay])
    after = service.fleet.registry.get("pi-1")
    assert after.last_finetune_at == before.last_finetune_at
    assert after.accuracy == before.accuracy == 0.9
    events = service.metrics_report().events
    assert sum(isinstance(e, FinetuneReported) for e in events) == 1


def test_a_device_flapping_its_presence_is_asked_once_until_that_ask_is_handed_out(tmp_path, clock):
    """A device on a valid account publishing presence after presence (each a new seq) must not
    make the coordinator queue a copy of its open jobs per presence (an amplification: a small
    presence in, a job command or a pointer with an inline adapter out, each). While the ask
    waits unsent in the outbox it goes out after every one of those presences anyway: one copy.
    Once it is handed out, the next presence asks again (the device may have missed it)."""
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    service.ingest([devices["pi-1"].presence() for _ in range(50)])
    service.ingest([devices["pi-1"].presence() for _ in range(50)])  # another batch
    assert jobs_in(service.tick(), JobKind.FINETUNE) == [("pi-1", jobs["pi-1"])]
    service.ingest([devices["pi-1"].presence()])  # the copy was handed out: asked again
    assert jobs_in(service.tick(), JobKind.FINETUNE) == [("pi-1", jobs["pi-1"])]


def test_a_refused_report_replayed_under_a_new_seq_is_not_recorded_again(tmp_path, clock):
    """A report the coordinator refused (its job FAILED) still records what the device did,
    once: the same job's report sent again as a new message records nothing more."""
    service = FleetService(make_config(tmp_path), clock=clock)
    devices, jobs = dispatched(service, clock, "pi-1", "pi-2")
    job_id = jobs["pi-1"].job_id
    service.ingest([devices["pi-1"].report(job_id, base_hash="f" * 64)])  # refused
    assert service.fleet.jobs.get(job_id).state.value == "FAILED"
    clock.advance(30.0)
    before = service.fleet.registry.get("pi-1")
    service.ingest([devices["pi-1"].report(job_id, after=0.2)])
    assert service.fleet.registry.get("pi-1").last_finetune_at == before.last_finetune_at
    events = service.metrics_report().events
    assert sum(isinstance(e, FinetuneReported) for e in events) == 1
