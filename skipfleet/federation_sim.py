"""A fleet's federated learning, run in one process on real data: the benchmark's engine.

Devices train with the agent's trainer and judge adapters as the agent does (agent.trainer:
finetune with a warm start and a step budget, `measure` and `better_than`); the coordinator's
decisions are its own code: clusters (coordinator.clustering), when to stop a run
(coordinator.federation), exact aggregation (coordinator.aggregation) and the canary verdict
(coordinator.rollout). What is simulated is only the transport: here a round is a loop.

Strategies: what each device would run at the end.
- base: the base model alone.
- own: each labelled device fine-tunes alone (the same method, `own_epochs` epochs) and runs
  the result if it measures better on its hold-out; devices without labels stay on the base.
- today: the coordinator before clustering: one cohort, one round of A·B factors from fresh
  starts, the exact aggregate installed on every device.
- one-cohort: the federated run over the whole fleet as one cluster, with the per-device rules.
- clustered: the same per cluster of devices with alike signatures.
- pooled: one adapter trained on every labelled device's rows together (the upper bound of a
  single adapter), installed everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.drift import score_window
from agent.trainer.adapter import Adapter
from agent.trainer.evaluation import Measure, measure
from agent.trainer.finetune import finetune
from coordinator.aggregation import STRATEGIES as AGGREGATIONS
from coordinator.aggregation import (
    AdapterShape,
    FitResult,
    TrustBounds,
    bound_reports,
)
from coordinator.clustering import DEFAULT_CLUSTER_DISTANCE, assign, cluster_signatures
from coordinator.federation import FederationPolicy, Measured, Next, RunProgress, is_last
from coordinator.rollout import CanaryResult, RolloutPolicy, RolloutState, canary_verdict
from skipfleet.federation_scenarios import SIGNATURE_ROWS, Fleet, SimDevice

# The calibrated threshold: 1.0 is the base model's own (coordinator --label-free-threshold).
LABEL_FREE_THRESHOLD = 1.0

STRATEGIES = ("base", "own", "today", "one-cohort", "clustered", "pooled")


@dataclass(frozen=True)
class Settings:
    method: str = "skip2-delta"
    policy: FederationPolicy = field(default_factory=FederationPolicy)
    rollout: RolloutPolicy = field(default_factory=lambda: RolloutPolicy(min_canaries=2))
    cluster_distance: float = DEFAULT_CLUSTER_DISTANCE
    label_free_drifted_only: bool = True  # --label-free-rollout drifted (the default)
    lr: float | None = None  # None: the scenario's step size
    algorithm: str = "exact-delta"
    bounds: TrustBounds = field(default_factory=TrustBounds)
    own_epochs: int = 30
    today_epochs: int = 30


@dataclass
class Outcome:
    """What each device runs at the end, and how the fleet got there."""

    running: dict[str, Adapter | None]
    clusters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    promoted: dict[str, bool] = field(default_factory=dict)


def window_scores(fleet: Fleet, inputs: np.ndarray, adapter=None):
    """What the device's heartbeat would say over its last SIGNATURE_ROWS inputs (the agent's
    own scoring: calibrated label-free scores and the feature signature)."""
    return score_window(fleet.model, inputs[-SIGNATURE_ROWS:], adapter)


class Federation:
    """One scenario fleet under one seed: every strategy's end state."""

    def __init__(self, fleet: Fleet, settings: Settings, seed: int):
        self.fleet, self.settings, self.seed = fleet, settings, seed
        model = fleet.model
        self.shape = AdapterShape(tuple(model.layer_input_dims), model.n_classes)
        self.labelled = [d for d in fleet.devices if d.labelled]
        self._outliers: dict[str, set[str]] = {}

    def run(self, strategy: str) -> Outcome:
        runs: dict[str, Callable[[], Outcome]] = {
            "base": lambda: Outcome({d.device_id: None for d in self.fleet.devices}),
            "own": self._own,
            "today": self._today,
            "one-cohort": lambda: self._federate({"cohort": list(self.fleet.devices)}),
            "clustered": lambda: self._federate(self._clusters()),
            "pooled": self._pooled,
        }
        return runs[strategy]()

    # ------------------------------------------------------------------- strategies
    def _own(self) -> Outcome:
        running = {d.device_id: None for d in self.fleet.devices}
        for d in self.labelled:
            result = self._train(d, None, epochs=self.settings.own_epochs, tag="own")
            if self._measure(d, result).better_than(self._measure(d, None)):
                running[d.device_id] = result
        return Outcome(running)

    def _today(self) -> Outcome:
        reports = [
            self._fit(
                d,
                self._train(
                    d, None, epochs=self.settings.today_epochs, tag="today", method="skip2-lora"
                ),
            )
            for d in self.labelled
        ]
        arrays = AGGREGATIONS["exact-delta"](self.shape).aggregate_fit(reports).arrays
        model = self.fleet.model
        fleet_adapter = Adapter.from_arrays(arrays, model.layer_input_dims, model.n_classes)
        return Outcome({d.device_id: fleet_adapter for d in self.fleet.devices})

    def _pooled(self) -> Outcome:
        X = np.concatenate([d.train.X for d in self.labelled])
        y = np.concatenate([d.train.y for d in self.labelled])
        result = finetune(self.fleet.model, X, y, method=self.settings.method,
                          epochs=self.settings.own_epochs, lr=self.fleet.lr,
                          seed=self._seed("pooled")).adapter  # fmt: skip
        return Outcome({d.device_id: result for d in self.fleet.devices})

    def _clusters(self) -> dict[str, list[SimDevice]]:
        signatures = {
            d.device_id: window_scores(self.fleet, d.inputs).signature for d in self.fleet.devices
        }
        labelled = {d: s for d, s in signatures.items() if self._by_id(d).labelled}
        found = cluster_signatures(labelled, max_distance=self.settings.cluster_distance)
        clusters = {f"c{k}": [self._by_id(d) for d in c.members] for k, c in enumerate(found)}
        centroids = {f"c{k}": c.centroid for k, c in enumerate(found)}
        for d in self.fleet.devices:  # devices without labels join the nearest cluster
            if not d.labelled:
                chosen = assign(signatures[d.device_id], centroids,
                                max_distance=self.settings.cluster_distance)  # fmt: skip
                if chosen is not None:
                    clusters[chosen].append(d)
        return clusters

    def _federate(self, clusters: dict[str, list[SimDevice]]) -> Outcome:
        outcome = Outcome({d.device_id: None for d in self.fleet.devices})
        runs = {d.device_id: self._measure(d, None) for d in self.labelled}  # what each runs
        for cluster_id, members in clusters.items():
            outcome.clusters[cluster_id] = tuple(d.device_id for d in members)
            candidate, rounds = self._run_cluster(cluster_id, members, outcome.running, runs)
            outcome.rounds[cluster_id] = rounds
            outcome.promoted[cluster_id] = self._roll_out(
                cluster_id, members, candidate, outcome.running, runs
            )
        return outcome

    # ---------------------------------------------------------------- one cluster's run
    def _run_cluster(self, cluster_id, members, running, runs) -> tuple[Adapter | None, int]:
        labelled = [d for d in members if d.labelled]
        if not labelled:
            return None, 0
        progress = RunProgress(self.settings.policy)
        aggregates: dict[int, Adapter | None] = {0: None}
        outliers = self._outliers.setdefault(cluster_id, set())
        while True:
            r = progress.rounds_done + 1
            reports, before = [], {}
            for d in labelled:
                start = aggregates[r - 1]
                result = self._train(d, start, steps=self.settings.policy.steps,
                                     tag=f"{cluster_id}/{r}")  # fmt: skip
                measured = self._measure(d, start)
                before[d.device_id] = Measured(measured.accuracy, measured.loss)
                after = self._measure(d, result)
                if after.better_than(runs[d.device_id]):  # the device keeps it as personal
                    running[d.device_id], runs[d.device_id] = result, after
                reports.append(self._fit(d, result))
            decision = progress.record_round(before)
            if decision.next is Next.STOP:
                return aggregates.get(decision.candidate), progress.rounds_done
            aggregates[r] = self._aggregate(reports, aggregates[r - 1], outliers)
            if is_last(decision):
                return aggregates[r], progress.rounds_done

    def _roll_out(self, cluster_id, members, candidate, running, runs) -> bool:
        """The cluster's canary on its labelled members (the candidate against the cluster's
        current adapter, the base model here); then devices without labels take it, and
        labelled ones only if it measures better than what they run."""
        labelled = [d for d in members if d.labelled]
        judges = [d for d in labelled if d.device_id not in self._outliers.get(cluster_id, ())]
        if candidate is None or len(judges) < self.settings.rollout.min_canaries:
            return False
        results = [
            CanaryResult(
                d.device_id, self._measure(d, candidate).accuracy, self._measure(d, None).accuracy
            )
            for d in judges
        ]
        state, _ = canary_verdict(results, self.settings.rollout, version=1)
        if state is not RolloutState.PROMOTED:
            return False
        for d in members:
            if not d.labelled:  # it cannot measure: it takes it only if it drifted
                if self._drifted(d, running[d.device_id]):
                    running[d.device_id] = candidate
                continue
            offered = self._measure(d, candidate)
            if offered.better_than(runs[d.device_id]):
                running[d.device_id], runs[d.device_id] = candidate, offered
        return True

    def _drifted(self, d: SimDevice, running) -> bool:
        """The coordinator's rule for a device without labels (--label-free-rollout drifted)."""
        if not self.settings.label_free_drifted_only:
            return True
        score = window_scores(self.fleet, d.inputs, running).confidence_score
        return score is not None and score > LABEL_FREE_THRESHOLD

    # ------------------------------------------------------------------------ helpers
    def _train(self, d: SimDevice, start, *, tag, steps=None, epochs=30, method=None) -> Adapter:
        return finetune(self.fleet.model, d.train.X, d.train.y,
                        method=method or self.settings.method, epochs=epochs, steps=steps,
                        lr=self.fleet.lr, seed=self._seed(f"{tag}/{d.device_id}"),
                        start=start).adapter  # fmt: skip

    def _fit(self, d: SimDevice, adapter: Adapter) -> FitResult:
        return FitResult(d.device_id, adapter.to_arrays(), len(d.train))

    def _aggregate(self, reports: list[FitResult], start=None, outliers=None) -> Adapter:
        """As the coordinator does: reports bounded (coordinator.aggregation.bounds), then the
        configured strategy; clipped devices join the cluster's outliers (no canary)."""
        start_arrays = None if start is None else start.to_arrays()
        registered = {r.device_id: r.num_samples for r in reports}  # honest: what they hold
        bounded = bound_reports(reports, shape=self.shape, bounds=self.settings.bounds,
                                registered=registered, start=start_arrays)  # fmt: skip
        if outliers is not None:
            outliers |= bounded.outliers
        strategy = AGGREGATIONS[self.settings.algorithm](self.shape)
        arrays = strategy.aggregate_fit(bounded.results).arrays
        model = self.fleet.model
        return Adapter.from_arrays(arrays, model.layer_input_dims, model.n_classes)

    def _measure(self, d: SimDevice, adapter) -> Measure:
        return measure(self.fleet.model, d.holdout.X, d.holdout.y, adapter)

    def _seed(self, tag: str) -> int:
        digest = hashlib.sha256(f"{self.seed}/{tag}".encode()).digest()
        return int.from_bytes(digest[:4], "big")

    def _by_id(self, device_id: str) -> SimDevice:
        return next(d for d in self.fleet.devices if d.device_id == device_id)


def scored_accuracy(fleet: Fleet, device: SimDevice, adapter) -> float:
    return fleet.model.accuracy(device.test.X, device.test.y, adapter)
