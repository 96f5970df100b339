"""The simulation itself: start everything, run the rounds, watch, collect (skipfleet simulate)."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

from shared.mqtt import parse_broker_url
from shared.protocol.enums import JobState
from skipfleet.coordinator_process import ApiClient, CoordinatorProcess
from skipfleet.probe import FleetProbe
from skipfleet.scenario import build_scenario
from skipfleet.sim_results import Progress, collect
from skipfleet.simulate import DEFAULT_EPOCHS, DEFAULT_LR

POLL_S = 1.0
MONITOR_EVERY_S = 10.0  # with a drift event: how often the devices are asked for their accuracy
# Below this measured accuracy the coordinator fine-tunes by itself. The fmnist CNN is ~85 %
# accurate upright, so 0.9 would fire before any drift; a camera turned 30° drops to ~40 %.
ACCURACY_THRESHOLD = {"fmnist": 0.6}


def start_broker(url: str | None, run_dir: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    """(broker URL, what it is): the given one, else mosquitto if installed, else Python's."""
    if url:
        return url, "given"
    from skipfleet.brokers import MosquittoBroker, find_mosquitto

    if find_mosquitto() is not None:
        broker = MosquittoBroker(run_dir / "broker")
        broker.start()
        stack.callback(broker.stop)
        return broker.url, "mosquitto (private, on a free port)"
    from skipfleet.minibroker import MiniBroker

    broker = MiniBroker("127.0.0.1").start()
    stack.callback(broker.stop)
    return broker.url, "embedded Python broker (mosquitto is not installed)"


class Simulation:
    def __init__(self, args, data_dir: Path, run_dir: Path):
        self.args, self.data_dir, self.run_dir = args, data_dir, run_dir
        self.drift = args.drift_at is not None
        self.t0 = time.monotonic()
        self.progress = Progress(self.t0)

    def say(self, message: str) -> None:
        self.progress.say(message)

    # ---------------------------------------------------------------- set up
    def run(self) -> dict:
        a = self.args
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"run dir {self.run_dir}")
        scenario = build_scenario(
            a.dataset,
            a.devices,
            self.data_dir,
            self.run_dir / "data",
            drift=self.drift,
            seed=a.seed,
            log=self.say,
        )
        with contextlib.ExitStack() as stack:
            broker_url, broker_kind = start_broker(a.broker, self.run_dir, stack)
            self.say(f"broker: {broker_kind} at {broker_url}")
            self.api = self._start_coordinator(broker_url, stack)
            self.probe = FleetProbe(parse_broker_url(broker_url), "skipfleet-simulate")
            stack.callback(self.probe.close)
            self._start_fleet(broker_url, scenario, stack)
            self.t0 = time.monotonic()  # the agents' clocks (and --drift-at) start about now
            rounds, evaluations = self._run_rounds(len(scenario.devices))
            return collect(self, scenario, broker_kind, rounds, evaluations)

    def _start_coordinator(self, broker_url: str, stack) -> ApiClient:
        a = self.args
        settings = {
            "--ray-address": a.ray_address,
            # a name of its own: never another coordinator's actor on a shared Ray
            "--actor-name": f"skipfleet-simulate-{uuid.uuid4().hex[:8]}",
            "--epochs": DEFAULT_EPOCHS[a.dataset],
            "--lr": DEFAULT_LR[a.dataset],
            "--max-concurrent-jobs": max(4, 3 * a.devices),
            "--round-deadline-seconds": a.timeout,
            "--trigger-cooldown-seconds": 5,
            # a simulated fleet is small and its devices differ by design (each fan group
            # records its own classes): with the default tenth, one device is the whole canary,
            # and a device the fleet adapter helps would promote it over those it hurts
            "--canary-fraction": 0.5,
        }
        if self.drift:  # the coordinator decides by itself: drift score, or measured accuracy
            settings.update(
                {
                    "--drift-threshold": 1.0,
                    "--drift-margin": 0.4,
                    "--accuracy-threshold": ACCURACY_THRESHOLD.get(a.dataset, 0.9),
                }
            )
        else:  # rounds only when asked
            settings.update(
                {
                    "--drift-threshold": "off",
                    "--accuracy-threshold": "off",
                    "--accuracy-drop-margin": "off",
                }
            )
        knobs = [str(part) for pair in settings.items() for part in pair]
        coordinator = CoordinatorProcess(
            broker_url, self.run_dir / "coordinator", self.run_dir / "coordinator.log", knobs
        )
        stack.callback(coordinator.stop)
        self.say(f"starting the coordinator (Ray: {a.ray_address})...")
        coordinator.wait_healthy(self.args.timeout)
        self.metrics_url = coordinator.metrics_url
        self.say(f"coordinator up: API {coordinator.api.base_url}, metrics {self.metrics_url}")
        return coordinator.api

    def _start_fleet(self, broker_url: str, scenario, stack) -> None:
        from skipfleet.fleet.control import ControlServer
        from skipfleet.fleet.supervisor import AgentSpec, ProcessFleet

        agent_args = ["--heartbeat-seconds", "1", "--stream-rows", "16", "--seed", "0"]
        drift = ("--drift-at", str(self.args.drift_at)) if self.drift else ()
        specs = [  # only devices with a drifted stream can drift (a 14 cm fan never went noisy)
            AgentSpec(d.device_id, d.data_file, drift if d.drifts else ()) for d in scenario.devices
        ]
        fleet = ProcessFleet(
            broker_url, scenario.base_model, specs, self.run_dir / "fleet", agent_args=agent_args
        )
        stack.callback(fleet.stop)
        fleet.start()
        control = ControlServer(fleet).start()
        stack.callback(control.stop)
        fleet.set_control_url(control.url)
        self.say(
            f"{len(specs)} agents started; inject faults with: "
            f"skipfleet fleet --control {control.url} ls|kill|pause|cut DEVICE"
        )

    # ---------------------------------------------------------------- rounds
    def _run_rounds(self, n_devices: int) -> tuple[list[str], dict]:
        self._wait(lambda: self._online() >= n_devices, f"all {n_devices} devices online")
        evaluations = {"start": self.evaluate_all("accuracy at start")}
        round_ids = []
        if self.drift:
            round_ids.append(self._wait_automatic_round())
        while len(round_ids) < self.args.rounds:
            started = self.api.post("/finetune", {"all": True})
            for skipped, why in started.get("skipped", {}).items():
                self.say(f"round request: {skipped} skipped ({why})")
            ids = [r["round_id"] for r in started["rounds"]]
            if not ids:
                raise RuntimeError(f"no round could start: {started}")
            self.say(f"round {len(round_ids) + 1} requested: {', '.join(ids)}")
            for round_id in ids:
                self._wait_round(round_id)
            round_ids += ids
        evaluations["end"] = self.evaluate_all("accuracy with what each device runs at the end")
        version = self._latest_fleet_version(round_ids)
        if version is not None:  # measured on every device, promoted or not
            evaluations["fleet"] = self.evaluate_all(
                f"accuracy with fleet adapter v{version}", version
            )
            evaluations["fleet_version"] = version
        return round_ids, evaluations

    def _latest_fleet_version(self, round_ids: list[str]) -> int | None:
        stored = [r for r in self.api.get("/rounds") if r["round_id"] in round_ids]
        versions = [r["adapter_version"] for r in stored if r.get("adapter_version")]
        return max(versions) if versions else None

    def _wait_automatic_round(self) -> str:
        drift_at = self.args.drift_at
        self.say(
            f"waiting for the drift event at t={drift_at:.0f} s and the coordinator's response"
        )
        last_monitor = 0.0

        def started() -> str | None:
            nonlocal last_monitor
            for record in self.api.get("/rounds"):
                if record["trigger"] != "request":
                    return record["round_id"]
            if self.elapsed() > drift_at and time.monotonic() - last_monitor > MONITOR_EVERY_S:
                last_monitor = time.monotonic()  # monitoring: devices measure their accuracy
                self.api.post("/evaluate", {"all": True})
            return None

        round_id = self._wait(started, "an automatic round", self.args.timeout + drift_at)
        record = next(r for r in self.api.get("/rounds") if r["round_id"] == round_id)
        self.say(f"the coordinator started {round_id} by itself ({record['trigger']})")
        self._wait_round(round_id)
        return round_id

    def _wait_round(self, round_id: str) -> None:
        def finished() -> bool:
            record = next((r for r in self.api.get("/rounds") if r["round_id"] == round_id), None)
            if record is None or record["stage"] in ("RUNNING", "AGGREGATING"):
                return False
            if record["stage"] == "FAILED":
                return True
            outcome = self._rollout_state(record)
            if outcome == "PROMOTED":
                version = record["adapter_version"]
                return all(d["adapter_version"] == version for d in self._devices() if d["online"])
            return outcome in ("ROLLED_BACK", "not rolled out")

        self._wait(finished, f"round {round_id} to finish and its adapter to be applied")
        self.say(f"round {round_id} finished")

    def _rollout_state(self, record: dict) -> str | None:
        if record.get("rollout_id") is None:
            return "not rolled out" if record.get("rollout_note") else None
        for cohort in self.api.get("/adapters"):
            for rollout in cohort["rollouts"]:
                if rollout["rollout_id"] == record["rollout_id"]:
                    return rollout["state"]
        return None

    def evaluate_all(self, what: str, version: int | None = None) -> dict[str, float]:
        """Every device measures the adapter it runs (or `version`) on its own hold-out."""
        body = {"all": True} if version is None else {"all": True, "adapter_version": version}
        asked = self.api.post("/evaluate", body)["evaluating"]
        accuracies = {}
        for item in asked:
            status, _ = self.probe.job_status(item["job_id"], JobState.SUCCEEDED, self.args.timeout)
            accuracies[item["device"]] = float(status.detail["accuracy"])
        mean = sum(accuracies.values()) / max(len(accuracies), 1)
        self.say(f"{what}: mean {mean * 100:.1f} % over {len(accuracies)} devices")
        return accuracies

    # ---------------------------------------------------------------- helpers
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _devices(self) -> list[dict]:
        return self.api.get("/devices")

    def _online(self) -> int:
        return sum(1 for d in self._devices() if d["online"])

    def _wait(self, condition, what: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.args.timeout)
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.progress.show(self.api)
            time.sleep(POLL_S)
        raise TimeoutError(f"timed out waiting for {what} (see the logs in {self.run_dir})")
