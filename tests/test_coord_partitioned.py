"""A coordinator split into 2 partitions, for real: a private mosquitto, simulated devices
(the load generator) in two cohorts that belong to different partitions, and a round per cohort.

First on the session's Ray (one node), then on a local two-node Ray cluster started with
`ray start` (a head with the resource node_0, a second node with node_1), the coordinator
joining it by address with each partition pinned to one node. Every wait reads the API.
"""

from __future__ import annotations

import dataclasses
import urllib.request
import uuid
from pathlib import Path

import pytest

from agent.data.dataset import Dataset
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.learner import load_base_model
from agent.trainer.finetune import pretrain
from coordinator.fleet import task_name
from coordinator.partitioned_app import PartitionedCoordinator
from coordinator.partitions import partition_of
from coordinator.registry import cohort_id
from skipfleet.coordinator_process import ApiClient, CoordinatorProcess
from skipfleet.loadgen.fleet import SimulatedFleet
from skipfleet.ray_nodes import NO_TOKEN_AUTH, LocalRayCluster
from tests.test_loadgen import coordinator_config, wait

pytestmark = pytest.mark.slow

DEVICES_PER_COHORT = 2
LOADGEN_OPTIONS = ["--heartbeat-seconds", "1", "--device-seconds", "0.3", "--epochs", "5"]


@pytest.fixture(scope="module")
def world(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partitioned-world")
    silent = load_fan_split(data_dir, "damage1", "pretrain")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    pretrain(silent.X, silent.y, 3, epochs=10, lr=0.05, seed=0).save(root / "base.npz")
    write_device_file(root / "device.npz", Dataset(noisy.X, noisy.y, 3, {}))
    return root


def metrics_text(coordinator: PartitionedCoordinator) -> str:
    url = f"http://127.0.0.1:{coordinator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def cohort_per_partition(base_model: Path) -> list[tuple[str, str]]:
    """(the agents' --cohort, the registry's cohort id) owned by partition 0, then by 1."""
    base_hash = load_base_model(base_model).weights_hash
    found: dict[int, tuple[str, str]] = {}
    for name in (f"fans{n}" for n in range(100)):
        cohort = cohort_id(base_hash, task_name(name))
        found.setdefault(partition_of(cohort, 2), (name, cohort))
    return [found[0], found[1]]


def start_devices(broker_url: str, world: Path, work: Path, cohorts) -> list[SimulatedFleet]:
    fleets = []
    for index, (name, _) in enumerate(cohorts):
        fleet = SimulatedFleet(
            broker_url, world / "base.npz", [world / "device.npz"], DEVICES_PER_COHORT, 1,
            work / f"devices-{index}",
            options=[*LOADGEN_OPTIONS, "--cohort", name, "--id-prefix", f"c{index}"],
        )  # fmt: skip
        fleets.append(fleet)
        fleet.start(60)
    return fleets


def run_a_round_per_cohort(api: ApiClient, cohorts, fleets) -> list[dict]:
    """Every device registered in its cohort, then one fine-tune request for the whole fleet:
    a round per cohort, each stored and its adapter made current. Returns /health."""
    expected = {d: c for (_, c), f in zip(cohorts, fleets, strict=True) for d in f.device_ids}
    wait(lambda: {d["device_id"]: d["cohort"] for d in api.get("/devices") if d["online"]}
         == expected)  # fmt: skip
    opened = api.post("/finetune", {"all": True})["rounds"]
    assert sorted(r["cohort"] for r in opened) == sorted(c for _, c in cohorts)
    stored = wait(lambda: len(r := [x for x in api.get("/rounds") if x["stage"] == "STORED"]) == 2
                  and r, timeout=50)  # fmt: skip
    for record in stored:
        devices = sorted(d for d, c in expected.items() if c == record["cohort"])
        assert sorted(record["answered"]) == devices

    # then each cohort's canary promotes its round's adapter
    def promoted() -> set[str]:
        return {a["cohort"] for a in api.get("/adapters") if a["current_version"] is not None}

    wait(lambda: promoted() == {c for _, c in cohorts}, timeout=30)
    return api.get("/health")["partitions"]


def assert_each_ingest_took_a_share(partitions: list[dict], devices: int) -> None:
    """Each device report reached exactly one ingest (the share group), both ingests took
    some of the fleet's messages, and each saw every device's presence (status is whole)."""
    assert sum(p["received"].get("report", 0) for p in partitions) == devices
    for p in partitions:
        assert p["mqtt_connected"] and p["devices"] == DEVICES_PER_COHORT
        shared = sum(n for kind, n in p["received"].items() if kind != "status")
        assert shared > 0, p
        assert p["received"]["status"] >= devices, p


def test_two_partitions_each_run_their_cohorts_round_and_survive_a_crash(
    ray_session, mosquitto, world, tmp_path
):
    cohorts = cohort_per_partition(world / "base.npz")
    config = dataclasses.replace(
        coordinator_config(mosquitto.url, tmp_path / "coordinator"),
        partitions=2, instance=f"part-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    coordinator = PartitionedCoordinator.start(config)
    api = ApiClient(f"http://127.0.0.1:{coordinator.api.port}", token_file=config.token_path)
    fleets: list[SimulatedFleet] = []
    try:
        fleets = start_devices(mosquitto.url, world, tmp_path, cohorts)
        partitions = run_a_round_per_cohort(api, cohorts, fleets)
        assert_each_ingest_took_a_share(partitions, 2 * DEVICES_PER_COHORT)
        # the owner's state dir holds each cohort: partition 0 the first, partition 1 the other
        by_device = {d["device_id"]: d["cohort"] for d in api.get("/devices")}
        assert len(by_device) == 2 * DEVICES_PER_COHORT
        for index, (_, cohort) in enumerate(cohorts):
            state = config.state_dir / "partitions" / f"p{index}" / "adapters"
            assert any(cohort in str(path) for path in state.rglob("*")), index
        # one device's views come from the partition that has it, lists merge newest first
        for fleet, (_, cohort) in zip(fleets, cohorts, strict=True):
            device = fleet.device_ids[0]
            assert api.get(f"/devices/{device}")["cohort"] == cohort
            assert {j["device_id"] for j in api.get(f"/jobs?device={device}")} == {device}
        newest = api.get("/jobs?limit=3")
        assert len(newest) == 3 and newest == sorted(newest, key=lambda j: -j["created_at"])
        assert {c["cohort"] for c in api.get("/clusters")} == {c for _, c in cohorts}
        # /metrics from every partition's report (fetched every metrics interval)
        known = f"skipfleet_devices_known {2 * DEVICES_PER_COHORT}.0"
        wait(lambda: known in metrics_text(coordinator))
        # a partition that crashes comes back (Ray restarts it), reloads its cohort and
        # reconnects its ingest; the other partition forwards to it again
        before = partitions[1]["pid"]
        ray_session.kill(coordinator.handles[1], no_restart=False)
        wait(lambda: (p := api.get("/health")["partitions"][1])["pid"] != before
             and p["mqtt_connected"], timeout=40)  # fmt: skip
        assert len(api.get("/devices")) == 2 * DEVICES_PER_COHORT
        second = api.post("/finetune", {"cohort": cohorts[1][1]})["rounds"]
        assert [r["cohort"] for r in second] == [cohorts[1][1]]
        wait(lambda: any(r["round_id"] == second[0]["round_id"] and r["stage"] == "STORED"
                         for r in api.get("/rounds")), timeout=40)  # fmt: skip
    finally:
        for fleet in fleets:
            fleet.stop()
        coordinator.stop()


@pytest.fixture
def two_node_ray(tmp_path):
    """A head (resource node_0) and a second node (node_1) on this machine, 1 CPU each."""
    with LocalRayCluster(2, cpus_per_node=1, log_dir=tmp_path / "ray") as cluster:
        yield cluster


def test_partitions_pinned_to_two_ray_nodes_each_run_their_round(
    two_node_ray, mosquitto, world, tmp_path
):
    cohorts = cohort_per_partition(world / "base.npz")
    coordinator = CoordinatorProcess(
        mosquitto.url, tmp_path / "coordinator", tmp_path / "coordinator.log",
        ["--ray-address", two_node_ray.address, "--partitions", "2",
         "--partition-resources", ",".join(two_node_ray.resources),
         "--instance", f"nodes-{uuid.uuid4().hex[:6]}",
         "--accuracy-threshold", "off", "--accuracy-drop-margin", "off", "--max-rounds", "1",
         "--canary-fraction", "1.0", "--tick-seconds", "0.2", "--epochs", "5"],
        env=NO_TOKEN_AUTH,
    )  # fmt: skip
    fleets: list[SimulatedFleet] = []
    try:
        coordinator.wait_healthy(60)
        fleets = start_devices(mosquitto.url, world, tmp_path, cohorts)
        partitions = run_a_round_per_cohort(coordinator.api, cohorts, fleets)
        # each partition's actor ran on the node with its resource: two nodes, one each
        assert [set(p["resources"]) for p in partitions] == [{"node_0"}, {"node_1"}], partitions
        assert len({p["node_id"] for p in partitions}) == 2
        assert_each_ingest_took_a_share(partitions, 2 * DEVICES_PER_COHORT)
    finally:
        for fleet in fleets:
            fleet.stop()
        assert coordinator.stop() == 0, coordinator.tail()
