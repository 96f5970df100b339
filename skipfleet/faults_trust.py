"""The trust scenarios of `skipfleet bench faults`, run on the coordinator's fleet state itself
(coordinator.service.FleetService: bounds, aggregation, canaries, deadlines) with a manual
clock, and devices that train and measure on real data (skipfleet.faults_devices).

"Harmed": an honest device whose accuracy on the noisy room's test rows (which no device trains
or judges on) with what it runs after a round is more than HARM_POINTS below what it ran before.
Seconds here are the coordinator clock's (ManualClock, advanced STEP_S per tick).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coordinator.clock import ManualClock
from coordinator.config import AggregationAlgorithm, CoordinatorConfig
from coordinator.federation import FederationPolicy
from coordinator.rollout import RolloutPolicy
from coordinator.scheduler import SchedulerPolicy
from coordinator.service import FleetService
from shared.mqtt import MqttSettings
from skipfleet.faults_devices import Device, Liar, Mute, Overflow
from skipfleet.faults_table import Row
from skipfleet.faults_world import FanWorld

DEFAULT_ALGORITHM = CoordinatorConfig.__dataclass_fields__["algorithm"].default.value

HARM_POINTS = 0.02  # one test row is 0.0021 of the 470: a drop of 10 rows or more
STEP_S = 1.0
HEARTBEAT_S = 5.0
ROUND_DEADLINE_S = 120.0
LIMIT_S = 1800.0  # a round not decided by then is wedged


def make_service(
    state_dir: Path, clock: ManualClock, algorithm: str = DEFAULT_ALGORITHM, **policy
) -> FleetService:
    """The coordinator's defaults where they matter here: canary fraction 0.1 with at least 2
    canaries, the default aggregation (coordinate-median), the trust bounds; one round per run,
    one cluster per cohort."""
    settings = {
        "max_concurrent_jobs": 8,
        "accuracy_threshold": None,
        "accuracy_drop_margin": None,
        "drift_threshold": None,
        "job_timeout_s": 60.0,
        "round_deadline_s": ROUND_DEADLINE_S,
        "min_completion_ratio": 0.6,
        **policy,
    }
    config = CoordinatorConfig(
        mqtt=MqttSettings("localhost"),
        state_dir=state_dir,
        metrics_port=0,
        api_port=0,
        policy=SchedulerPolicy(**settings),
        rollout=RolloutPolicy(min_canaries=2),
        federation=FederationPolicy(max_rounds=1),
        cluster_distance=None,
        algorithm=AggregationAlgorithm(algorithm),
    )
    return FleetService(config, clock=clock)


class Fleet:
    """The service, its clock and its devices, driven tick by tick."""

    def __init__(
        self,
        state_dir: Path,
        world: FanWorld,
        kinds: dict[str, type[Device]],
        algorithm: str = DEFAULT_ALGORITHM,
        **policy,
    ) -> None:
        self.clock = ManualClock()
        self.service = make_service(state_dir, self.clock, algorithm, **policy)
        versions: dict = {}
        self.devices = {
            name: kind(name, world, world.shares[k % len(world.shares)], self.clock, versions)
            for k, (name, kind) in enumerate(kinds.items())
        }
        hello = [m for d in self.devices.values() for m in (d.presence(), d.heartbeat())]
        self.service.ingest(hello)
        self._last_heartbeat = self.clock()

    def honest(self) -> list[Device]:
        return [d for d in self.devices.values() if type(d) is Device]

    def step(self) -> int:
        """One tick: deliver what the service sent, feed back the answers. Messages sent."""
        outbound = self.service.tick()
        for o in outbound:
            self.service.ingest(self.devices[o.device_id].deliver(o.message))
        self.clock.advance(STEP_S)
        if self.clock() - self._last_heartbeat >= HEARTBEAT_S:
            self.service.ingest([d.heartbeat() for d in self.devices.values()])
            self._last_heartbeat = self.clock()
        return len(outbound)

    def run_until(self, done: Callable[[], bool]) -> float | None:
        """Seconds (coordinator clock) until done(); None: wedged (LIMIT_S passed)."""
        start = self.clock()
        while self.clock() - start < LIMIT_S:
            self.step()
            if done():
                return self.clock() - start
        return None

    def settled(self, round_id: str) -> bool:
        """The round is over and so is what followed it (canary, installs): nothing in flight."""
        record = next((r for r in self.service.rounds() if r["round_id"] == round_id), None)
        if record is None or record["stage"] in ("RUNNING", "AGGREGATING"):
            return False
        rollouts = [r for a in self.service.adapters() for r in a["rollouts"]]
        deciding = any(r["state"] == "CANARY" for r in rollouts)
        running = any(run["state"] != "DONE" for run in self.service.runs())
        return not (deciding or running) and self.service.health()["active_jobs"] == 0


def _one_round(fleet: Fleet) -> tuple[dict, float | None]:
    (opened,) = fleet.service.request_finetune(all_=True)["rounds"]
    took = fleet.run_until(lambda: fleet.settled(opened["round_id"]))
    record = next(r for r in fleet.service.rounds() if r["round_id"] == opened["round_id"])
    return record, took


def poisoning(
    world: FanWorld, workdir: Path, rounds: int = 10, algorithm: str = DEFAULT_ALGORITHM
) -> Row:
    """The liar's rounds, and the same rounds without it (what the liar cost the others).
    Another `algorithm` than the coordinator's default is a comparison, held to no target."""
    honest = {f"honest-{k}": Device for k in range(len(world.shares))}
    root = workdir / f"poisoning-{algorithm}"
    row = _poisoning(
        Fleet(root / "liar", world, honest | {"liar": Liar}, algorithm=algorithm), rounds
    )
    control = _poisoning(Fleet(root / "no-liar", world, honest, algorithm=algorithm), rounds)
    if algorithm != DEFAULT_ALGORITHM:
        row.scenario += f" ({algorithm})"
        row.comparison = True
    row.detail["without_the_liar"] = {
        key: control.detail[key] for key in ("test_accuracy_end", "worst_change_points")
    }
    row.detail["base_test_accuracy"] = world.model.accuracy(world.test.X, world.test.y)
    return row


def _accuracies(fleet: Fleet) -> dict[str, float]:
    return {d.device_id: d.test_accuracy() for d in fleet.honest()}


def _harmed(before: dict[str, float], after: dict[str, float]) -> int:
    return sum(1 for name, accuracy in after.items() if accuracy - before[name] < -HARM_POINTS)


def _lost(fleet: Fleet, record: dict) -> int:
    """Honest devices whose report is not in the round (each of them sent one)."""
    return sum(1 for d in fleet.honest() if d.device_id not in (record["answered"] or []))


def repeated(times: int, run: Callable[[int], Row]) -> Row:
    """One row for `times` runs of a scenario: counts summed, each run's figures kept."""
    rows = [run(k) for k in range(times)]
    first = rows[0]
    first.scenario += f", {times} runs" if times > 1 else ""
    first.reports_lost = sum(r.reports_lost or 0 for r in rows)
    first.honest_harmed = sum(r.honest_harmed or 0 for r in rows)
    first.held = all(r.held for r in rows)
    first.comparison = first.comparison or any(r.comparison for r in rows)
    first.detail = {"runs": [r.detail for r in rows], "summary": _summary(rows)}
    return first


def _summary(rows: list[Row]) -> dict:
    """Poisoning runs: the honest devices' test accuracy at the end, with and without the liar
    (means over devices and runs), and the worst one-round change of any honest device."""

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    runs = [r.detail for r in rows]
    return {
        "end_accuracy_with_liar": mean(a for d in runs for a in d["test_accuracy_end"].values()),
        "end_accuracy_without_liar": mean(
            a for d in runs for a in d["without_the_liar"]["test_accuracy_end"].values()
        ),
        "base_accuracy": runs[0]["base_test_accuracy"],
        "worst_change_points": min(d["worst_change_points"] for d in runs),
        "wedged_rounds": sum(d["wedged_rounds"] for d in runs),
    }


def _poisoning(fleet: Fleet, rounds: int) -> Row:
    harmed_total, worst, wedged, lost, per_round = 0, 0.0, 0, 0, []
    for _ in range(rounds):
        before = _accuracies(fleet)
        record, took = _one_round(fleet)
        after = _accuracies(fleet)
        wedged += took is None
        harmed_total += (harmed := _harmed(before, after))
        worst = min(worst, *(after[n] - before[n] for n in after))
        lost += _lost(fleet, record)
        per_round.append(
            {
                "stage": record["stage"],
                "version": record["adapter_version"],
                "harmed": harmed,
                "liar_weight": (record["weights"] or {}).get("liar"),
                "running": {d.device_id: d.running for d in fleet.honest()},
            }
        )
    detail = {
        "rounds": per_round,
        "wedged_rounds": wedged,
        "worst_change_points": worst * 100,
        "test_accuracy_end": _accuracies(fleet),
    }
    return Row(
        f"poisoning device, {rounds} rounds",
        "samples=2**62, update 999 against its own, canary answers 1.0/0.0",
        reports_lost=lost,
        honest_harmed=harmed_total,
        held=harmed_total == 0 and wedged == 0 and lost == 0,
        detail=detail,
    )


def overflow(world: FanWorld, workdir: Path) -> Row:
    kinds = {f"honest-{k}": Device for k in range(len(world.shares))} | {"big": Overflow}
    fleet = Fleet(workdir / "overflow", world, kinds)
    before = _accuracies(fleet)
    record, took = _one_round(fleet)
    harmed, lost = _harmed(before, _accuracies(fleet)), _lost(fleet, record)
    again = fleet.service.request_finetune(all_=True)  # the cohort is free: a new round starts
    detail = {
        "stage": record["stage"],
        "failures": record["failures"],
        "wedged": took is None,
        "next_round_started": bool(again["rounds"]),
        "health": fleet.service.health(),
    }
    held = took is not None and bool(again["rounds"]) and harmed == 0 and lost == 0
    return Row(
        "1e30 report",
        "one device reports a finite 1e30 adapter",
        reports_lost=lost,
        honest_harmed=harmed,
        recover_s=took,
        held=held,
        detail=detail,
    )


def silent(world: FanWorld, workdir: Path) -> Row:
    """A device that heartbeats but never answers, in a cohort of honest ones: its round closes
    at the round's deadline with the others, and its job holds no slot another round needs."""
    kinds = {f"honest-{k}": Device for k in range(len(world.shares))} | {"mute": Mute}
    fleet = Fleet(workdir / "silent", world, kinds, max_concurrent_jobs=len(world.shares))
    (opened,) = fleet.service.request_finetune(all_=True)["rounds"]
    took = fleet.run_until(lambda: fleet.settled(opened["round_id"]))
    record = next(r for r in fleet.service.rounds() if r["round_id"] == opened["round_id"])
    closed = record["closed_at"]
    late = None if closed is None else closed - (record["started_at"] + ROUND_DEADLINE_S)
    lost = _lost(fleet, record)
    detail = {
        "stage": record["stage"],
        "failures": record["failures"],
        "closed_late_s": late,
        "round_deadline_s": ROUND_DEADLINE_S,
        "settled_after_s": took,
    }
    held = took is not None and late is not None and late <= STEP_S and lost == 0
    return Row(
        "silent device",
        "one device online, never answers its job",
        reports_lost=lost,
        recover_s=None if late is None else max(late, 0.0),
        held=held,
        detail=detail,
    )
