"""The round pipeline: trigger → round over a cohort's reachable devices → (scheduler: jobs, at
most K at a time, deadline) → closed → aggregated (exact-delta, naive FedAvg beside it) → stored
as a new version with its lineage → canary (coordinator.distribution).

A round is per cohort, because only devices with the same base model and task share adapters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator.aggregate_task import (
    AggregationOutcome,
    AggregationRequest,
    Aggregator,
    algorithms_for,
)
from coordinator.aggregation import FitFailure, FitResult, aggregation_gap
from coordinator.distribution import AdapterDistributor
from coordinator.fleet import Conflict, Fleet, select_devices
from coordinator.observations import AggregationTimed, RoundFinished, RoundResult
from coordinator.registry import DeviceRecord
from coordinator.round_records import RoundStage
from coordinator.rounds import RoundOutcome, RoundStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedRounds:
    rounds: tuple[dict, ...] = ()  # {"round_id", "cohort", "devices"}
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why it is in no round

    def as_dict(self) -> dict:
        return {"rounds": list(self.rounds), "skipped": dict(self.skipped)}


class RoundPipeline:
    def __init__(
        self, fleet: Fleet, aggregator: Aggregator, distributor: AdapterDistributor
    ) -> None:
        self._fleet = fleet
        self._aggregator = aggregator
        self._distributor = distributor

    # ---- triggers

    def start_rounds(self, device_ids: Iterable[str], trigger: str) -> StartedRounds:
        """One round per cohort over the given devices that are reachable now."""
        f = self._fleet
        by_cohort: dict[str, list[DeviceRecord]] = {}
        skipped: dict[str, str] = {}
        for device in dict.fromkeys(device_ids):
            record = f.registry.get(device)
            if record is None:
                skipped[device] = "unknown device"
            elif record.cohort is None:
                skipped[device] = "no presence received yet (cohort unknown)"
            else:
                by_cohort.setdefault(record.cohort, []).append(record)
        started = []
        for cohort, records in by_cohort.items():
            try:
                started.append(self._start_round(cohort, records, trigger, skipped))
            except Conflict as err:
                skipped.update({r.device_id: str(err) for r in records})
        return StartedRounds(tuple(s for s in started if s is not None), skipped)

    def request(
        self, *, devices: Sequence[str] | None = None, cohort: str | None = None, all_: bool = False
    ) -> StartedRounds:
        """The operator's fine-tune request (HTTP API): exactly one of the three selectors."""
        selected = select_devices(self._fleet, devices=devices, cohort=cohort, all_=all_)
        return self.start_rounds(selected, "request")

    def trigger_automatically(self) -> None:
        """A round for every idle cohort where some reachable device fires a scheduler trigger
        (accuracy below threshold, drop since the last fine-tune, drift)."""
        f = self._fleet
        now = f.clock()
        for cohort, members in f.registry.cohorts().items():
            if f.records.active_for_cohort(cohort) or f.rollouts.active(cohort):
                continue
            records = [f.registry.get(d) for d in members]
            # Noticing drift needs only a reachable device: one busy with an evaluation, say,
            # still counts; its fine-tune job simply waits in the round like any other.
            eligible = [r for r in records if f.reachable(r)]
            fired = [t for r in eligible if (t := f.triggers.automatic_trigger(r, now))]
            if fired:
                log.info("cohort %s: %s fired, starting a round", cohort, fired[0].value)
                self.start_rounds([r.device_id for r in records], fired[0].value)

    # ---- closing and aggregating

    def on_closed(self, statuses: Iterable[RoundStatus]) -> None:
        f = self._fleet
        for status in statuses:
            record = f.records.get(status.round_id)
            if record is None:
                continue  # a round not started by this pipeline
            completed = status.outcome is RoundOutcome.COMPLETED
            f.records.closed(
                status.round_id,
                completed=completed,
                answered=status.answered,
                failures=status.failed,
                at=f.clock(),
            )
            log.info(
                "round %s closed %s: answered %s, failed %s",
                status.round_id,
                status.outcome,
                list(status.answered),
                dict(status.failed),
            )
            if completed:
                self._submit(status.round_id)
            else:
                self._finished(status.round_id, RoundResult.FAILED)

    def resume(self) -> None:
        """After a restart: finish what a crash interrupted between two checkpoints."""
        f = self._fleet
        for record in f.records.in_stage(RoundStage.RUNNING):
            # Closed by the scheduler, but the crash came before its record was.
            outcome = f.rounds.outcome(record.round_id)
            if outcome not in (None, RoundOutcome.RUNNING):
                status = f.scheduler.round_status(record.round_id)
                log.info("round %s: recording its close (%s)", record.round_id, outcome)
                self.on_closed([dataclasses.replace(status, outcome=outcome, pending=())])
        pending = self._aggregator.pending()
        for record in f.records.in_stage(RoundStage.AGGREGATING):
            if record.round_id not in pending:
                log.info("round %s: resuming its aggregation", record.round_id)
                self._submit(record.round_id)

    def collect(self) -> None:
        for outcome in self._aggregator.collect():
            self._on_aggregated(outcome)

    # ---- internals

    def _start_round(
        self, cohort: str, records: list[DeviceRecord], trigger: str, skipped: dict[str, str]
    ) -> dict | None:
        f = self._fleet
        active = f.records.active_for_cohort(cohort)
        if active is not None:
            raise Conflict(f"cohort {cohort} has round {active.round_id} under way")
        members = [r.device_id for r in records if f.reachable(r)]
        unreachable = {
            r.device_id: f"not reachable ({f.scheduler.skip_reason(r, f.clock()).value})"
            for r in records
            if r.device_id not in members
        }
        skipped.update(unreachable)
        if not members:
            return None
        rnd = f.scheduler.start_round(members)
        f.records.open(
            rnd.round_id,
            cohort=cohort,
            trigger=trigger,
            started_at=rnd.started_at,
            skipped=unreachable,
        )
        log.info("round %s (%s) on cohort %s: %s", rnd.round_id, trigger, cohort, members)
        return {"round_id": rnd.round_id, "cohort": cohort, "devices": members}

    def _submit(self, round_id: str) -> None:
        f = self._fleet
        record = f.records.get(round_id)
        request = self._request(round_id, record.cohort, record.answered or (), record.failures)
        if isinstance(request, str):
            f.records.aggregation_failed(round_id, request, f.clock())
            self._finished(round_id, RoundResult.FAILED)
            return
        self._aggregator.submit(request, algorithms_for(f.config.algorithm.value))

    def _request(
        self, round_id: str, cohort: str, answered: Sequence[str], failed: dict | None
    ) -> AggregationRequest | str:
        """The round's inputs (each answering device's latest valid report), or why none."""
        f = self._fleet
        latest = {meta.device_id: meta for meta in f.reports.for_round(round_id)}
        failures = [FitFailure(d, why) for d, why in (failed or {}).items()]
        results = []
        for device in answered:
            meta = latest.get(device)
            if meta is None:
                failures.append(FitFailure(device, "succeeded without a valid report"))
            else:
                results.append(FitResult(device, f.reports.arrays(meta), meta.samples))
        if not results:
            return "no valid report to aggregate"
        first = latest[results[0].device_id]
        return AggregationRequest(
            round_id=round_id,
            cohort=cohort,
            base_model_hash=first.base_model_hash,
            shape=first.shape,
            results=tuple(results),
            failures=tuple(failures),
            parent_version=f.store.current_version(cohort),
        )

    def _on_aggregated(self, outcome: AggregationOutcome) -> None:
        f = self._fleet
        request = outcome.request
        for run in outcome.runs:
            f.events.record(AggregationTimed(run.algorithm, run.seconds))
        chosen = outcome.run(f.config.algorithm.value)
        if chosen is None or chosen.result is None:
            error = chosen.error if chosen else "the configured strategy did not run"
            log.warning("round %s: aggregation failed: %s", request.round_id, error)
            f.records.aggregation_failed(request.round_id, error, f.clock())
            self._finished(request.round_id, RoundResult.FAILED)
            return
        result = chosen.result
        # Stored already if the actor died right after saving: never two versions of one round.
        versions = f.store.versions(request.cohort)
        meta = next((m for m in versions if m.round_id == request.round_id), None)
        meta = meta or f.store.save(
            request.cohort,
            result.arrays,
            base_model_hash=request.base_model_hash,
            algorithm=result.algorithm,
            device_ids=result.device_ids,
            round_id=request.round_id,
            parent_version=f.store.current_version(request.cohort),
        )
        f.records.stored(
            request.round_id,
            algorithm=result.algorithm,
            version=meta.version,
            weights=result.weights,
            failures={x.device_id: x.reason for x in result.failures},
            gap=_gap(outcome),
            at=f.clock(),
        )
        log.info(
            "round %s: %s v%d from %s",
            request.round_id,
            request.cohort,
            meta.version,
            list(result.device_ids),
        )
        self._finished(request.round_id, RoundResult.COMPLETED)
        rollout_id, note = self._distributor.start_canary(request.cohort, meta.version)
        f.records.rollout(request.round_id, rollout_id=rollout_id, note=note)

    def _finished(self, round_id: str, result: RoundResult) -> None:
        f = self._fleet
        record = f.records.get(round_id)
        f.events.record(RoundFinished(result, max(0.0, f.clock() - record.started_at)))


def _gap(outcome: AggregationOutcome) -> dict:
    """How far naive FedAvg lands from the exact aggregate (relative Frobenius, per layer)."""
    exact, naive = outcome.run("exact-delta"), outcome.run("naive-fedavg")
    if exact is None or exact.result is None:
        return {"error": "no exact aggregate to compare with"}
    if naive is None or naive.result is None:
        return {"error": f"naive FedAvg not computed: {naive.error if naive else 'not run'}"}
    gap = aggregation_gap(exact.result.arrays, naive.result.arrays, outcome.request.shape)
    return {"relative_frobenius": list(gap.relative_frobenius)}
