"""Federated runs through the fleet state, without Ray or MQTT: rounds that warm-start from the
last aggregate, clusters from signatures, offers a device takes only if they measure better, and
devices without labels that get their cluster's adapter only behind a canary and a drift."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.clock import ManualClock
from coordinator.federation import FederationPolicy
from coordinator.rollout import RolloutPolicy
from coordinator.service import SCAN_INTERVAL_S, FleetService
from shared.protocol import AdapterOrigin, DesiredState, JobKind, JobState
from tests.coord_fleet_helpers import SimDevice, fail_handling_for, jobs_in, make_config

H = 96
QUIET, NOISY = np.zeros(H), np.ones(H)  # two places in signature space, 1.0 rms apart


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(tmp_path, clock, *, rounds=3, min_canaries=2, **policy) -> FleetService:
    federation = FederationPolicy(max_rounds=rounds, steps=30, patience=1)
    rollout = RolloutPolicy(canary_fraction=1.0, max_accuracy_regression=0.02,
                            min_canaries=min_canaries)  # fmt: skip
    config = make_config(tmp_path, federation=federation, rollout=rollout, **policy)
    return FleetService(config, clock=clock)


def join(service, clock, *specs) -> dict[str, SimDevice]:
    """specs: (name, signature, labelled)."""
    devices = {
        name: SimDevice(name, clock, signature=sig, labelled=labelled)
        for name, sig, labelled in specs
    }
    service.ingest([m for d in devices.values() for m in (d.presence(), d.heartbeat())])
    return devices


def answer_round(service, devices, outbound, before: float, loss: float) -> list:
    """Every fine-tune job in outbound reports an adapter whose start measured `before`."""
    jobs = jobs_in(outbound, JobKind.FINETUNE)
    for device, job in jobs:
        service.ingest(devices[device].finetune(job.job_id, before=before, loss_before=loss,
                                                after=before + 0.05, installed=False))  # fmt: skip
    return jobs


def answer_evaluations(service, devices, outbound, candidate: float, current: float) -> None:
    evaluations = jobs_in(outbound, JobKind.EVALUATE)
    reference = min(j.params.adapter_version for _, j in evaluations)
    for device, job in evaluations:
        accuracy = current if job.params.adapter_version == reference else candidate
        status = devices[device].status(job.job_id, JobState.SUCCEEDED, {"accuracy": accuracy})
        service.ingest([status])


def promoted_to_two(tmp_path, clock):
    """Two labelled devices' round, its canary passed: the service, the devices, and the
    APPLY_ADAPTER job each was offered (by device)."""
    service = start(tmp_path, clock, rounds=1)
    devices = join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    service.request_finetune(all_=True)
    answer_round(service, devices, service.tick(), before=0.6, loss=1.0)
    answer_evaluations(service, devices, service.tick(), candidate=0.9, current=0.6)
    return service, devices, dict(jobs_in(service.tick(), JobKind.APPLY_ADAPTER))


def test_rounds_warm_start_from_the_last_aggregate_until_the_gain_stops(tmp_path, clock):
    service = start(tmp_path, clock, rounds=5)
    devices = join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    service.request_finetune(all_=True)
    first = answer_round(service, devices, service.tick(), before=0.6, loss=1.0)
    assert {j.params.start_version for _, j in first} == {0}  # the base model: nothing before
    assert {j.params.steps for _, j in first} == {30}  # a step budget, the same everywhere
    second = answer_round(service, devices, service.tick(), before=0.8, loss=0.5)
    assert {j.params.start_version for _, j in second} == {1}  # continues from aggregate 1
    third = answer_round(service, devices, service.tick(), before=0.8, loss=0.49)  # stalled
    assert {j.params.start_version for _, j in third} == {2}
    outbound = service.tick()
    assert jobs_in(outbound, JobKind.FINETUNE) == []  # the run stopped: gain and loss flat
    (run,) = service.runs()
    cluster = run["clusters"]["all"]  # no signatures: the cohort is one cluster
    assert cluster["rounds"] == 3 and cluster["stage"] == "ROLLING_OUT"
    # the best measured: aggregate 2, as accurate as aggregate 1 with a lower loss
    assert cluster["candidate"] == 2 and "too little" in cluster["note"]
    assert cluster["measured"]["1"]["accuracy"] == pytest.approx(0.8)
    assert {j.params.adapter_version for _, j in jobs_in(outbound, JobKind.EVALUATE)} == {0, 2}


def test_a_promoted_version_is_offered_and_a_device_keeps_what_measures_better(tmp_path, clock):
    service = start(tmp_path, clock, rounds=1)
    devices = join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    service.request_finetune(all_=True)
    answer_round(service, devices, service.tick(), before=0.6, loss=1.0)
    answer_evaluations(service, devices, service.tick(), candidate=0.9, current=0.6)
    outbound = service.tick()
    applies = dict(jobs_in(outbound, JobKind.APPLY_ADAPTER))
    assert sorted(applies) == ["pi-1", "pi-2"]
    assert all(job.params.only_if_better for job in applies.values())  # labelled: an offer
    pointers = [o.message for o in outbound if isinstance(o.message, DesiredState)]
    assert {p.only_if_better for p in pointers} == {True}
    taken = {"installed": True, "accuracy_candidate": 0.9, "accuracy_running": 0.7}
    kept = {"installed": False, "accuracy_candidate": 0.9, "accuracy_running": 0.95,
            "adapter_version": None, "origin": AdapterOrigin.PERSONAL.value}  # fmt: skip
    service.ingest([
        devices["pi-1"].status(applies["pi-1"].job_id, JobState.SUCCEEDED, taken),
        devices["pi-2"].status(applies["pi-2"].job_id, JobState.SUCCEEDED, kept),
    ])  # fmt: skip
    by_id = {d["device_id"]: d for d in service.devices()}
    assert (
        by_id["pi-1"]["running"]["version"] == 1 and by_id["pi-1"]["running"]["origin"] == "fleet"
    )
    assert "0.900 against 0.700" in by_id["pi-1"]["running"]["why"]
    assert by_id["pi-2"]["running"] == {
        "version": None,
        "origin": "personal",
        "why": "keeps its personal adapter, declined the cohort's v1: 0.900 against 0.950 "
        "on its hold-out",
    }
    assert (by_id["pi-2"]["offered_version"], by_id["pi-2"]["offer_result"]) == (1, "declined")
    clock.advance(SCAN_INTERVAL_S)
    assert jobs_in(service.tick(), JobKind.APPLY_ADAPTER) == []  # a declined offer stands


def test_devices_with_conflicting_inputs_train_and_roll_out_in_separate_clusters(tmp_path, clock):
    service = start(tmp_path, clock, rounds=1)
    devices = join(
        service, clock,
        ("quiet-1", QUIET, True), ("quiet-2", QUIET + 0.01, True),
        ("noisy-1", NOISY, True), ("noisy-2", NOISY - 0.01, True),
    )  # fmt: skip
    started = service.request_finetune(all_=True)["rounds"][0]
    assert sorted(map(sorted, started["clusters"].values())) == [
        ["noisy-1", "noisy-2"],
        ["quiet-1", "quiet-2"],
    ]
    answer_round(service, devices, service.tick(), before=0.6, loss=1.0)
    outbound = service.tick()  # two aggregates, two canaries, each on its own members
    versions = {v["version"]: v["cluster"] for v in service.adapters()[0]["versions"]}
    assert sorted(versions) == [1, 2] and len(set(versions.values())) == 2
    canaries = {}
    for device, job in jobs_in(outbound, JobKind.EVALUATE):
        canaries.setdefault(job.params.adapter_version, set()).add(device)
    by_cluster = {versions[v]: members for v, members in canaries.items() if v}
    assert sorted(map(sorted, by_cluster.values())) == [
        ["noisy-1", "noisy-2"],
        ["quiet-1", "quiet-2"],
    ]


def test_a_device_without_labels_gets_its_clusters_adapter_only_behind_a_canary_and_a_drift(
    tmp_path, clock
):
    service = start(tmp_path, clock, rounds=1)
    devices = join(
        service, clock,
        ("noisy-1", NOISY, True), ("noisy-2", NOISY, True),
        ("noisy-new", NOISY + 0.05, False), ("noisy-calm", NOISY - 0.05, False),
    )  # fmt: skip
    service.ingest([
        devices["noisy-new"].heartbeat(confidence=1.8, feature=2.5),  # drifted
        devices["noisy-calm"].heartbeat(confidence=0.4, feature=0.8),  # in distribution
    ])  # fmt: skip
    started = service.request_finetune(all_=True)
    assert started["skipped"]["noisy-new"].startswith("no labels")
    answer_round(service, devices, service.tick(), before=0.5, loss=1.2)
    outbound = service.tick()
    assert {d for d, _ in jobs_in(outbound, JobKind.EVALUATE)} == {"noisy-1", "noisy-2"}
    answer_evaluations(service, devices, outbound, candidate=0.95, current=0.5)
    applies = dict(jobs_in(service.tick(), JobKind.APPLY_ADAPTER))
    assert sorted(applies) == ["noisy-1", "noisy-2", "noisy-new"]
    assert applies["noisy-new"].params.only_if_better is False  # it cannot measure
    placed = {d["device_id"]: d["placed"] for d in service.devices()}
    assert placed["noisy-new"].startswith("nearest cluster")
    # the calm one drifts later: the next scan offers it the cluster's adapter
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([devices["noisy-calm"].heartbeat(confidence=1.5, feature=1.1)])
    assert [d for d, _ in jobs_in(service.tick(), JobKind.APPLY_ADAPTER)] == ["noisy-calm"]


def test_a_cluster_with_one_labelled_member_has_no_canary_and_no_label_free_rollout(
    tmp_path, clock
):
    service = start(tmp_path, clock, rounds=1, min_canaries=2)
    devices = join(service, clock, ("solo", NOISY, True), ("new", NOISY, False))
    service.ingest([devices["new"].heartbeat(confidence=2.0, feature=2.0)])
    service.request_finetune(all_=True)
    answer_round(service, devices, service.tick(), before=0.5, loss=1.2)
    outbound = service.tick()
    assert jobs_in(outbound, JobKind.EVALUATE) == []  # one device's word is not enough
    applies = dict(jobs_in(outbound, JobKind.APPLY_ADAPTER))
    assert list(applies) == ["solo"] and applies["solo"].params.only_if_better
    (run,) = service.runs()
    assert (
        run["state"] == "DONE" and "needs 2" in run["clusters"][next(iter(run["clusters"]))]["note"]
    )


def test_a_label_free_score_over_its_threshold_starts_a_run_once(tmp_path, clock):
    service = start(tmp_path, clock, rounds=1, label_free_threshold=1.0, label_free_margin=0.5,
                    trigger_cooldown_s=0.0, label_free_persistence_s=8.0)  # fmt: skip
    devices = join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    service.ingest([devices["pi-1"].heartbeat(confidence=0.6, feature=0.9)])
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert service.runs() == []  # in distribution
    service.ingest([devices["pi-1"].heartbeat(confidence=1.4, feature=1.1)])
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert service.runs() == []  # over the threshold for 5 s: not yet a lasting drift
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([devices["pi-1"].heartbeat(confidence=1.5, feature=1.1)])
    outbound = service.tick()  # the run starts, and its first jobs go out in the same tick
    (run,) = service.runs()
    assert run["trigger"] == "label_free_drift"
    answer_round(service, devices, outbound, before=0.6, loss=1.0)
    answer_evaluations(service, devices, service.tick(), candidate=0.6, current=0.6)
    service.tick()
    assert service.runs()[0]["state"] == "DONE"
    clock.advance(SCAN_INTERVAL_S)  # the drift stays (an adapter does not move inputs back)
    service.ingest([devices["pi-1"].heartbeat(confidence=1.4, feature=1.1)])
    service.tick()
    assert len(service.runs()) == 1
    clock.advance(SCAN_INTERVAL_S)  # it gets clearly worse (over 1.5 + margin): a new run
    service.ingest([devices["pi-1"].heartbeat(confidence=2.1, feature=1.1)])
    service.tick()
    assert len(service.runs()) == 2
    service.ingest([devices["pi-1"].heartbeat(confidence=0.5, feature=1.1)])  # and it passes
    assert (
        next(d for d in service.devices() if d["device_id"] == "pi-1")["label_free_since"] is None
    )


def test_a_restarted_service_carries_on_with_a_run_between_rounds(tmp_path, clock):
    service = start(tmp_path, clock, rounds=3)
    devices = join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    service.request_finetune(all_=True)
    first = service.tick()
    answer_round(service, devices, first, before=0.6, loss=1.0)
    service.tick([o.seq for o in first])  # the broker acknowledged the first round's jobs
    service.close()
    again = start(tmp_path, clock, rounds=3)  # the same state dir
    second = jobs_in(again.tick(), JobKind.FINETUNE)
    assert {j.params.start_version for _, j in second} == {1}
    (run,) = again.runs()
    assert run["state"] == "RUNNING" and len(run["rounds"]) == 2


def test_a_device_already_running_the_offered_version_counts_as_installed(tmp_path, clock):
    """The retained pointer can reach the agent before the apply job does."""
    service, devices, applies = promoted_to_two(tmp_path, clock)
    already = {"already_running": True, "installed": False, "adapter_version": 1,
               "origin": AdapterOrigin.FLEET.value}  # fmt: skip
    service.ingest([devices["pi-1"].status(applies["pi-1"].job_id, JobState.SUCCEEDED, already)])
    pi1 = next(d for d in service.devices() if d["device_id"] == "pi-1")
    assert (pi1["offer_result"], pi1["running"]["version"], pi1["running"]["origin"]) == (
        "installed",
        1,
        "fleet",
    )


def test_a_cluster_whose_members_change_loses_a_version_its_new_members_never_judged(
    tmp_path, clock
):
    """A version's canary speaks for the devices it was measured on; after re-clustering
    brings others in, a device without labels waits for the next canary."""
    service = start(tmp_path, clock, rounds=1)
    devices = join(service, clock, ("noisy-1", NOISY, True), ("noisy-2", NOISY, True),
                   ("other", QUIET, True))  # fmt: skip
    service.request_finetune(devices=["noisy-1", "noisy-2"])
    answer_round(service, devices, service.tick(), before=0.5, loss=1.2)
    answer_evaluations(service, devices, service.tick(), candidate=0.95, current=0.5)
    service.tick()
    (cluster,) = [c for c in service.clusters()[0]["clusters"] if c["current_version"]]
    assert sorted(cluster["members"]) == ["noisy-1", "noisy-2"]
    # "other" moves into the noisy room; a device without labels arrives there too
    devices["other"].signature = NOISY + 0.02
    new = SimDevice("noisy-new", clock, signature=NOISY, labelled=False)
    devices["noisy-new"] = new
    service.ingest([devices["other"].heartbeat(), new.presence(), new.heartbeat(confidence=3.0)])
    service.request_finetune(all_=True)  # re-clusters: the noisy cluster has a third member
    (now,) = [c for c in service.clusters()[0]["clusters"] if "other" in c["members"]]
    assert now["cluster"] == cluster["cluster"] and now["current_version"] is None
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([new.heartbeat(confidence=3.0)])
    assert "noisy-new" not in {d for d, _ in jobs_in(service.tick(), JobKind.APPLY_ADAPTER)}


def test_a_new_device_without_labels_gets_its_clusters_adapter_before_it_can_start_a_run(
    tmp_path, clock
):
    service = start(tmp_path, clock, rounds=1, label_free_threshold=1.0, trigger_cooldown_s=0.0)
    devices = join(service, clock, ("noisy-1", NOISY, True), ("noisy-2", NOISY, True))
    service.request_finetune(all_=True)
    answer_round(service, devices, service.tick(), before=0.5, loss=1.2)
    answer_evaluations(service, devices, service.tick(), candidate=0.95, current=0.5)
    service.tick()
    new = SimDevice("noisy-new", clock, signature=NOISY, labelled=False)
    service.ingest([new.presence(), new.heartbeat(confidence=4.0)])  # drifted, just joined
    clock.advance(SCAN_INTERVAL_S)
    outbound = service.tick()
    assert len(service.runs()) == 1  # no run: its cluster has an adapter for it
    assert [d for d, _ in jobs_in(outbound, JobKind.APPLY_ADAPTER)] == ["noisy-new"]


def test_a_new_device_is_placed_where_its_clusters_members_signatures_are_now(tmp_path, clock):
    """A run can start before a drift has filled its members' windows: the cluster was formed
    where they were (quiet); a newcomer that looks like them now (noisy) still finds it."""
    service = start(tmp_path, clock, rounds=1, label_free_threshold=1.0, trigger_cooldown_s=0.0)
    devices = join(service, clock, ("fan-1", QUIET, True), ("fan-2", QUIET, True))
    service.request_finetune(all_=True)  # clustered on the quiet signatures
    answer_round(service, devices, service.tick(), before=0.5, loss=1.2)
    answer_evaluations(service, devices, service.tick(), candidate=0.95, current=0.5)
    service.tick()
    for device in devices.values():
        device.signature = NOISY  # their windows now hold the noisy room
    service.ingest([d.heartbeat() for d in devices.values()])
    new = SimDevice("noisy-new", clock, signature=NOISY, labelled=False)
    service.ingest([new.presence(), new.heartbeat(confidence=4.0)])
    clock.advance(SCAN_INTERVAL_S)
    outbound = service.tick()
    assert [d for d, _ in jobs_in(outbound, JobKind.APPLY_ADAPTER)] == ["noisy-new"]
    placed = {m for c in service.clusters()[0]["clusters"] for m in c["members"]}
    assert "noisy-new" in placed


def test_the_scan_reads_a_cohorts_placements_once_not_a_query_per_device(tmp_path, clock):
    service, devices, applies = promoted_to_two(tmp_path, clock)
    failed = devices["pi-2"].status(applies["pi-2"].job_id, JobState.FAILED)
    service.ingest([failed])  # pi-2 is owed the version again once its back-off passes

    def one_device_query(*args):
        raise AssertionError("a placement read per device")

    clock.advance(3600.0)  # past the scan interval and the failed apply's back-off
    service.ingest([devices["pi-2"].heartbeat()])  # and reachable still
    service.fleet.clusters.placement = one_device_query
    assert [d for d, _ in jobs_in(service.tick(), JobKind.APPLY_ADAPTER)] == ["pi-2"]


def test_a_scan_sorts_the_fleet_for_the_automatic_trigger_only_while_a_cohort_is_idle(
    tmp_path, clock
):
    service = start(tmp_path, clock, rounds=2)
    join(service, clock, ("pi-1", None, True), ("pi-2", None, True))
    walks: list[str] = []
    registry = service.fleet.registry
    walk = registry.by_cohort
    registry.by_cohort = lambda: walks.append("walk") or walk()
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert walks == ["walk", "walk"]  # the trigger's, then reconcile's
    service.request_finetune(all_=True)  # the only cohort is in a run now
    walks.clear()
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert walks == ["walk"]  # reconcile's alone


def clustered_with_strangers(tmp_path, clock, strangers: int):
    """A cohort clustered on two quiet labelled devices, and devices without labels whose
    signatures are near no cluster (placed in none, tried again every scan)."""
    service = start(tmp_path, clock, rounds=1)
    devices = join(service, clock, ("fan-1", QUIET, True), ("fan-2", QUIET, True))
    service.request_finetune(all_=True)  # clusters the cohort
    far = [(f"far-{i}", NOISY * 5, False) for i in range(strangers)]
    devices |= join(service, clock, *far)
    cohort = service.fleet.registry.get("fan-1").cohort
    return service, devices, cohort


def test_a_scan_reads_a_cohorts_clusters_once_however_many_devices_no_cluster_takes(
    tmp_path, clock
):
    """Read per device, a pass over 6,000 devices with 1,000 placed in none took 7.7 s."""
    service, _, cohort = clustered_with_strangers(tmp_path, clock, strangers=30)
    placed = service.fleet.clusters.placed_in(cohort)
    assert {placed[f"far-{i}"].cluster for i in range(30)} == {None}
    book, reads = service.fleet.clusters, []
    clusters = book.clusters
    book.clusters = lambda c: reads.append(c) or clusters(c)
    clock.advance(SCAN_INTERVAL_S)
    service.tick()  # reconcile and the automatic triggers each pass over the cohort once
    assert 1 <= len(reads) <= 2


def test_a_device_still_near_no_cluster_is_not_placed_again_in_writing(tmp_path, clock):
    service, devices, cohort = clustered_with_strangers(tmp_path, clock, strangers=2)
    db = service.fleet.db

    def written() -> dict[str, float]:
        rows = db.query("SELECT device_id, at FROM cluster_members WHERE device_id LIKE 'far-%'")
        return {r["device_id"]: r["at"] for r in rows}

    clock.advance(SCAN_INTERVAL_S)
    service.tick()  # placed by their signatures (their presences came before them)
    assert service.fleet.clusters.placed_in(cohort)["far-0"].how.startswith("no cluster within")
    before = written()
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    assert written() == before  # the same placement (none), not rewritten every 5 s
    devices["far-1"].signature = QUIET  # its room now looks like the cluster's
    service.ingest([devices["far-1"].heartbeat()])
    clock.advance(SCAN_INTERVAL_S)
    service.tick()
    placed = service.fleet.clusters.placed_in(cohort)
    assert placed["far-1"].cluster is not None and placed["far-0"].cluster is None
    assert written()["far-1"] > before["far-1"] and written()["far-0"] == before["far-0"]


def count_cluster_reads(service) -> list[str]:
    book, reads = service.fleet.clusters, []
    clusters = book.clusters
    book.clusters = lambda c: reads.append(c) or clusters(c)
    return reads


def newcomers(clock, first: int, count: int, signature=QUIET) -> list[SimDevice]:
    return [SimDevice(f"new-{i}", clock, signature=signature, labelled=False)
            for i in range(first, first + count)]  # fmt: skip


def test_devices_joining_in_one_batch_read_their_cohorts_clusters_once_for_it(tmp_path, clock):
    """Read per device, 1,000 devices joining a 6,000-device clustered cohort cost 21 ms each."""
    service, _, cohort = clustered_with_strangers(tmp_path, clock, strangers=0)
    reads = count_cluster_reads(service)
    batch = newcomers(clock, 0, 20)
    service.ingest([m for d in batch for m in (d.presence(), d.heartbeat())])
    assert reads == [cohort]
    later = newcomers(clock, 20, 5)  # the next batch reads them afresh
    service.ingest([m for d in later for m in (d.presence(), d.heartbeat())])
    assert reads == [cohort, cohort]
    placed = service.fleet.clusters.placed_in(cohort)  # at their presence: no signature yet
    assert {placed[d.device_id].how for d in batch + later} == {
        "no signature and no labels: no cluster"
    }


def test_a_device_joining_in_a_batch_that_rolls_back_is_placed_when_it_is_applied_again(
    tmp_path, clock, monkeypatch
):
    """The batch's view holds no placement: each is read from its row, so the retry, message
    by message, finds the first one rolled back and places the device again."""
    service, _, cohort = clustered_with_strangers(tmp_path, clock, strangers=0)
    fail_handling_for(monkeypatch, service, "new-1")
    first, last = newcomers(clock, 0, 2)
    service.ingest([first.presence(), last.presence()])
    placed = service.fleet.clusters.placed_in(cohort)
    assert "new-0" in placed and "new-1" not in placed
