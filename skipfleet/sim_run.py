"""The simulation itself: start everything, run the rounds, watch, collect (skipfleet simulate).

Each run has its own name (`sim-<8 hex>`): its topic root, its coordinator's instance (MQTT client
id and Ray actor) and its probe's client id, so two runs (or a run and a real fleet) on one broker
or Ray never see or kick each other. At the end, after the agents and the coordinator stopped, it
deletes the retained messages left under its root (skipfleet.retained).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path

from shared.mqtt import parse_broker_url
from shared.protocol.enums import JobState
from shared.topics import Topics
from skipfleet.coordinator_process import ApiClient, CoordinatorProcess
from skipfleet.fleet.runstate import EVENTS_FILE, SIMULATE_FLEET_DIR
from skipfleet.probe import FleetProbe
from skipfleet.retained import clear_retained
from skipfleet.scenario import Scenario, build_scenario
from skipfleet.sim_results import Progress, collect
from skipfleet.simulate import DEFAULT_EPOCHS, DEFAULT_LR

POLL_S = 1.0
MONITOR_EVERY_S = 10.0  # with a drift event: how often the devices are asked for their accuracy
# The calibrated label-free score that starts a run by itself. The fan devices' quiet rooms are
# recorded apart from the base model's calibration recordings: at 1.0 the confidence score fires
# on 30 % of their windows before any drift, at 2.0 on 12 %, still 91 % of noisy-room windows
# (docs/benchmarks.md, "Label-free drift"). HAR: the devices' measured accuracy decides.
# fmnist: the CNN's calibrated confidence score is 0.84-0.89 on upright cameras' windows and
# 2.1-2.9 on cameras turned 30° or 75° (docs/agent.md): 1.5 leaves room on both sides. Its
# measured accuracy too, below 0.6: the CNN is ~85-89 % accurate upright, so 0.9 would fire
# before any drift, and a camera turned 30° drops to ~36 %.
LABEL_FREE_THRESHOLD = {"fan": 2.0, "har": "off", "fmnist": 1.5}
ACCURACY_THRESHOLD = {"fmnist": 0.6}
# A new device is placed by the signature in its heartbeats, and offered its cluster's version by
# the coordinator's catch-up scan (every 5 s): give both a moment before asking.
NEW_DEVICE_GRACE_S = 8.0
# A signature needs a full 256-row window: 4 heartbeats of 64 rows, plus slack for a busy machine
SIGNATURE_WAIT_S = 30.0
DRIFT_CLOCK_SLACK_S = 5.0


def start_broker(url: str | None, run_dir: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    """(broker URL, what it is): the given one, else a private mosquitto (MosquittoMissing, which
    says how to install it, if there is none)."""
    if url:
        return url, "given"
    from skipfleet.brokers import MosquittoBroker

    broker = MosquittoBroker(run_dir / "broker")
    broker.start()
    stack.callback(broker.stop)
    return broker.url, "mosquitto (private, on a free port)"


class Simulation:
    def __init__(
        self, args, data_dir: Path | None, run_dir: Path, prepared: Scenario | None = None
    ):
        """`prepared`: a fleet from `skipfleet prepare` (--fleet-dir), else one is built."""
        self.args, self.data_dir, self.run_dir = args, data_dir, run_dir
        self.prepared = prepared
        self.drift = args.drift_at is not None
        self.t0 = time.monotonic()
        self.wall_t0 = time.time()
        self.progress = Progress(self.t0)
        self.name = f"sim-{uuid.uuid4().hex[:8]}"  # topic root, coordinator instance, client ids
        self.cleared: list[str] = []  # the retained topics removed at the end

    def say(self, message: str) -> None:
        self.progress.say(message)

    # ---------------------------------------------------------------- set up
    def run(self, done=lambda result: None) -> dict:
        """The scenario's result. With --keep-running, `done(result)` is called with it while
        everything still runs, which it then does until the operator stops simulate."""
        a = self.args
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"run dir {self.run_dir}")
        scenario = self.prepared or build_scenario(
            a.dataset,
            a.devices,
            self.data_dir,
            self.run_dir / "data",
            drift=self.drift,
            seed=a.seed,
            new_devices=a.new_devices,
            log=self.say,
        )
        self.scenario = scenario
        with contextlib.ExitStack() as stack:
            broker_url, broker_kind = start_broker(a.broker, self.run_dir, stack)
            self.say(f"broker: {broker_kind} at {broker_url}, topic root {self.name}")
            stack.callback(self._clear_retained, broker_url)  # after everything else stopped
            self.api = self._start_coordinator(broker_url, stack)
            self.probe = FleetProbe(
                parse_broker_url(broker_url), f"{self.name}-probe", Topics(self.name)
            )
            stack.callback(self.probe.close)
            fleet = self._start_fleet(broker_url, scenario, stack)
            self.t0 = time.monotonic()  # the agents' clocks (and --drift-at) start about now
            self.wall_t0 = time.time()
            runs, evaluations = self._run_federation(scenario, fleet)
            result = {**collect(self, scenario, broker_kind, runs, evaluations),
                      "topic_root": self.name}  # fmt: skip
            if a.keep_running:
                done(result)
                keep_running(self.say, self.dashboard_url)
        return {**result, "retained_cleared": self.cleared}

    def _start_coordinator(self, broker_url: str, stack) -> ApiClient:
        a = self.args
        settings = {
            "--ray-address": a.ray_address,
            # a name of its own: its own MQTT client id and Ray actor on a shared broker or Ray
            "--instance": self.name,
            "--topic-root": self.name,
            "--max-concurrent-jobs": max(4, 3 * len(self.scenario.devices)),
            "--round-deadline-seconds": a.timeout,
            "--trigger-cooldown-seconds": 5,
            "--max-rounds": a.max_rounds,
            # a simulated fleet is small and its devices differ by design (each fan group
            # records its own classes): with the default tenth, one device is the whole canary,
            # and a device the fleet adapter helps would promote it over those it hurts
            "--canary-fraction": 0.5,
            # the faults `skipfleet fleet` injects, on the dashboard's timeline
            "--fleet-events-file": self.run_dir / "fleet" / EVENTS_FILE,
        }
        if self.scenario.dataset in DEFAULT_EPOCHS:  # a task of your own: the coordinator's
            settings["--epochs"] = DEFAULT_EPOCHS[self.scenario.dataset]
            settings["--lr"] = DEFAULT_LR[self.scenario.dataset]
        if self.drift:  # the coordinator decides by itself: drift score, or measured accuracy
            settings.update(
                {
                    "--label-free-threshold": LABEL_FREE_THRESHOLD[self.scenario.dataset],
                    # longer than the 256-row window takes to turn over (4 s): the run
                    # clusters by signatures that show the whole drift
                    "--label-free-seconds": 6,
                    "--accuracy-threshold": ACCURACY_THRESHOLD.get(a.dataset, 0.9),
                }
            )
        else:  # runs only when asked
            settings.update(
                {
                    "--label-free-threshold": "off",
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
        self.dashboard_url = f"{coordinator.api.base_url}/dashboard"
        self.say(f"coordinator up: API {coordinator.api.base_url}, metrics {self.metrics_url}")
        self.say(f"live dashboard: {self.dashboard_url}")
        return coordinator.api

    def _start_fleet(self, broker_url: str, scenario, stack) -> None:
        from skipfleet.fleet.control import ControlServer
        from skipfleet.fleet.supervisor import AgentSpec, ProcessFleet

        # 64 new input rows a second: the 256-row drift window turns over in 4 s, so the
        # signatures a run clusters by show a drift soon after it happens
        agent_args = ["--heartbeat-seconds", "1", "--stream-rows", "64", "--seed", "0",
                      "--topic-root", self.name]  # fmt: skip
        drift = ("--drift-at", str(self.args.drift_at)) if self.drift else ()
        specs = [  # only devices with a drifted stream can drift (a 14 cm fan never went noisy)
            AgentSpec(d.device_id, d.data_file, drift if d.drifts else ()) for d in scenario.devices
        ]
        fleet = ProcessFleet(
            broker_url,
            scenario.base_model,
            specs,
            self.run_dir / SIMULATE_FLEET_DIR,
            agent_args=agent_args,
        )
        stack.callback(fleet.stop)
        fleet.start()
        control = ControlServer(fleet).start()
        stack.callback(control.stop)
        fleet.set_control_url(control.url)
        self.say(
            f"{len(specs)} agents started; inject faults with: skipfleet fleet --run-dir "
            f"{self.run_dir} ls|kill|pause|cut DEVICE (or --control {control.url} "
            f"--token-file {control.token_file})"
        )
        return fleet

    # ---------------------------------------------------------------- runs
    def _run_federation(self, scenario, fleet) -> tuple[list[dict], dict]:
        n_devices = len(scenario.devices)
        self._wait(lambda: self._online() >= n_devices, f"all {n_devices} devices online")
        self._wait_signatures(n_devices)
        evaluations = {"start": self.evaluate_all("accuracy at start")}
        runs = []
        if self.drift:
            runs.append(self._wait_automatic_run())
            evaluations["answered_from"] = runs[0]["started_at"]  # the run after the drift
        while len(runs) < self.args.runs:
            started = self.api.post("/finetune", {"all": True})
            for skipped, why in started.get("skipped", {}).items():
                self.say(f"run request: {skipped} skipped ({why})")
            if not started["rounds"]:
                raise RuntimeError(f"no run could start: {started}")
            run_id = started["rounds"][0]["run_id"]
            self.say(f"run {len(runs) + 1} requested: {run_id}")
            runs.append(self._wait_run(run_id))
        if scenario.new_devices:
            self._join_new_devices(scenario, fleet)
        evaluations["end"] = self.evaluate_all("accuracy with what each device runs at the end")
        every_run = list(reversed(self.api.get("/runs")))  # also those it did not wait for
        return every_run, evaluations

    def _wait_automatic_run(self) -> dict:
        drift_at = self.args.drift_at
        self.say(
            f"waiting for the drift event at t={drift_at:.0f} s and the coordinator's response"
        )
        last_monitor = 0.0

        # the coordinator's clock is wall time; the agents started their drift clocks while the
        # fleet came up, a few seconds before wall_t0
        drifted_at = self.wall_t0 + drift_at - DRIFT_CLOCK_SLACK_S

        def started() -> str | None:
            nonlocal last_monitor
            for run in self.api.get("/runs"):
                if run["trigger"] != "request" and run["started_at"] >= drifted_at:
                    return run["run_id"]
            if self.elapsed() > drift_at and time.monotonic() - last_monitor > MONITOR_EVERY_S:
                last_monitor = time.monotonic()  # monitoring: devices measure their accuracy
                self.api.post("/evaluate", {"all": True})
            return None

        run_id = self._wait(started, "an automatic run", self.args.timeout + drift_at)
        run = next(r for r in self.api.get("/runs") if r["run_id"] == run_id)
        self.say(f"the coordinator started run {run_id} by itself ({run['trigger']})")
        return self._wait_run(run_id)

    def _wait_run(self, run_id: str) -> dict:
        """Until the run is done and every device with labels answered what it was offered."""

        def settled() -> dict | None:
            run = next((r for r in self.api.get("/runs") if r["run_id"] == run_id), None)
            if run is None or run["state"] != "DONE":
                return None
            pending = [
                d["device_id"]
                for d in self._devices()
                if d["online"] and d["offered_version"] is not None and d["offer_result"] is None
            ]
            return None if pending else run

        run = self._wait(settled, f"run {run_id} to finish and its offers to be answered")
        rounds = max((c["rounds"] for c in run["clusters"].values()), default=0)
        self.say(f"run {run_id} done after {rounds} round(s)")
        for cluster, c in run["clusters"].items():
            self.say(f"  cluster {cluster} ({', '.join(c['members'])}): {c['note']}")
        return run

    def _join_new_devices(self, scenario, fleet) -> None:
        from skipfleet.fleet.supervisor import AgentSpec

        new_at = self.args.new_at
        if new_at is not None and self.elapsed() < new_at:
            self._wait(lambda: self.elapsed() >= new_at, f"t={new_at:.0f} s to add new devices")
        for device in scenario.new_devices:
            fleet.join(AgentSpec(device.device_id, device.data_file))
            self.say(f"a new device without labels joins: {device.device_id}")
        ids = {d.device_id for d in scenario.new_devices}
        time.sleep(NEW_DEVICE_GRACE_S)  # its presence, heartbeats, and a catch-up scan

        def placed() -> bool:
            devices = {d["device_id"]: d for d in self._devices() if d["device_id"] in ids}
            return len(devices) == len(ids) and all(
                _new_device_settled(d) for d in devices.values()
            )

        self._wait(placed, "the new devices to be placed in clusters and given what they take")
        for d in self._devices():
            if d["device_id"] in ids:
                self.say(f"  {d['device_id']}: {d['placed']}; runs {_running(d)}")

    def evaluate_all(self, what: str, version: int | None = None) -> dict[str, float]:
        """Every device with labels measures the adapter it runs (or `version`) on its own
        hold-out (the coordinator skips the others: they cannot)."""
        body = {"all": True} if version is None else {"all": True, "adapter_version": version}
        asked = self.api.post("/evaluate", body)["evaluating"]
        accuracies = {}
        for item in asked:
            status, _ = self.probe.job_status(item["job_id"], JobState.SUCCEEDED, self.args.timeout)
            accuracies[item["device"]] = float(status.detail["accuracy"])
        mean = sum(accuracies.values()) / max(len(accuracies), 1)
        self.say(f"{what}: mean {mean * 100:.1f} % over {len(accuracies)} devices")
        return accuracies

    def _clear_retained(self, broker_url: str) -> None:
        try:
            self.cleared = clear_retained(
                parse_broker_url(broker_url), self.name, f"{self.name}-cleanup"
            )
        except (OSError, TimeoutError) as err:  # the run's results stand; say what is left
            self.say(f"could not remove the retained messages under {self.name}/: {err}")
            return
        self.say(f"removed {len(self.cleared)} retained messages under {self.name}/")

    # ---------------------------------------------------------------- helpers
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _devices(self) -> list[dict]:
        return self.api.get("/devices")

    def _online(self) -> int:
        return sum(1 for d in self._devices() if d["online"])

    def _signatures(self) -> int:
        return sum(1 for d in self._devices() if d.get("signature_rows"))

    def _wait_signatures(self, n_devices: int) -> None:
        """A run clusters its cohort by the devices' input signatures, which a device reports
        only once a full window of inputs has streamed in: a run requested before that puts
        every device in one cluster (seen with --fleet-dir on an idle machine)."""
        try:
            what = f"input signatures from all {n_devices} devices"
            self._wait(lambda: self._signatures() >= n_devices, what, SIGNATURE_WAIT_S)
        except TimeoutError:
            self.say(f"{self._signatures()} of {n_devices} devices report an input signature "
                     f"after {SIGNATURE_WAIT_S:.0f} s; runs cluster only those")  # fmt: skip

    def _wait(self, condition, what: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.args.timeout)
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.progress.show(self.api)
            time.sleep(POLL_S)
        raise TimeoutError(f"timed out waiting for {what} (see the logs in {self.run_dir})")


def keep_running(say, dashboard_url: str) -> None:
    """Waits until Ctrl-C or SIGTERM (as KeyboardInterrupt, unless another handler is set, as
    simulate's skipfleet.stopping does: its Stopped), so the caller's ExitStack stops everything
    in order and the run ends as a finished one."""
    import signal

    from skipfleet.stopping import Stopped

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, interrupt)
    say(f"the fleet keeps running: dashboard {dashboard_url} (Ctrl-C or SIGTERM to stop)")
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, Stopped):
        say("stopping the fleet")


def _running(device: dict) -> str:
    running = device.get("running") or {}
    if running.get("version") is not None:
        return f"v{running['version']}"
    return running.get("origin") or "the base model"


def _new_device_settled(device: dict) -> bool:
    """Heard from with its signature, placed (or told why not) by it, and, if it was offered its
    cluster's version, answered."""
    placed = device.get("placed") or ""
    if device.get("signature_rows") is None or not placed or placed.startswith("no signature"):
        return False
    return device.get("offered_version") is None or device.get("offer_result") is not None
