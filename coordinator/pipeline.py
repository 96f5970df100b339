"""The round pipeline: a trigger starts a federated run over a cohort (coordinator.runs).

trigger → clusters from signatures (coordinator.clusters) → round r over every cluster still
training: each labelled, reachable member fine-tunes for a step budget from its cluster's
aggregate r−1 (scheduler: jobs, at most K at a time, deadline) → closed: each cluster's reports
measure aggregate r−1 on its members' hold-outs (coordinator.federation decides: go on, or stop
with the best aggregate) → aggregated per cluster (exact-delta, naive FedAvg beside it) → stored
as a version tagged with its cluster → round r+1 ... → a stopped cluster's candidate goes to its
canary (coordinator.distribution), which gates it for the members that cannot measure.

One run per cohort at a time: only devices with the same base model and task share adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.adapter_store import AdapterStoreError
from coordinator.aggregate_task import AggregationOutcome, Aggregator, algorithms_for
from coordinator.aggregation import AggregateResult
from coordinator.clusters import CohortClusters, Placement
from coordinator.distribution import AdapterDistributor
from coordinator.federation import Next, RunProgress, is_last
from coordinator.fleet import Conflict, Fleet, select_devices
from coordinator.observations import AggregationTimed, RoundFinished, RoundResult, RunFinished
from coordinator.registry import DeviceRecord
from coordinator.round_inputs import aggregation_gap_view, aggregation_request, measured_before
from coordinator.round_records import ACTIVE_STAGES, RoundStage
from coordinator.rounds import RoundOutcome, RoundStatus
from coordinator.runs import ClusterRun, ClusterStage, Run, RunState, members_of
from coordinator.scheduler import label_free_score

log = logging.getLogger(__name__)

# Aggregating a cluster takes milliseconds to seconds (Ray tasks); one not back after this was
# lost (a crashed worker past its retries), and the cluster stops with what it measured.
AGGREGATION_TIMEOUT_S = 300.0
AGGREGATION_LOST = f"aggregation did not finish in {AGGREGATION_TIMEOUT_S:.0f} s"
# Reports whose arrays a scan drops at most, past the first round it drops (~0.08 s of CPU for
# 10,000 fan-sized reports): a long backlog goes over several scans.
RELEASE_PER_SCAN = 20_000


@dataclass(frozen=True)
class StartedRounds:
    # each {"round_id", "run_id", "cohort", "devices", "clusters"}
    rounds: tuple[dict[str, Any], ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why it is in no round

    def as_dict(self) -> dict[str, Any]:
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
        """One run per cohort over the given devices; its first round over those able now."""
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
                started.append(self._start_run(cohort, records, trigger, skipped))
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
        """A run for every idle cohort where some reachable device fires a scheduler trigger
        (accuracy below threshold, drop since the last fine-tune, drift)."""
        f = self._fleet
        now = f.clock()
        # Cohorts in a run or a canary are skipped before any walk of the fleet: during a
        # round, sorting it every scan for nothing was ~2 % of the actor at 10,000 devices.
        # The cohorts are the committed ones: a tick registers no device (ingest does), so
        # this transaction has none of its own that they could miss.
        idle = {
            c
            for c in f.registry.committed_cohorts()
            if not (f.runs.is_running(c) or f.rollouts.active(c))
        }
        if not idle:
            return
        for cohort, records in f.registry.by_cohort().items():
            if cohort not in idle:
                continue
            # Noticing drift needs only a reachable device: one busy with an evaluation, say,
            # still counts; its fine-tune job simply waits in the round like any other. A device
            # without labels whose cluster has an adapter for it gets that first (reconcile):
            # it starts a run only if it still drifts with what it runs.
            view = CohortClusters(f.clusters, cohort, functools.partial(tuple, records))
            eligible = [
                r for r in records if f.reachable(r) and not self._distributor.owes(r, view)
            ]
            fired = [t for r in eligible if (t := f.triggers.automatic_trigger(r, now))]
            if fired:
                log.info("cohort %s: %s fired, starting a run", cohort, fired[0].value)
                self.start_rounds([r.device_id for r in records], fired[0].value)

    # ---- the run's steps

    def on_closed(self, statuses: Iterable[RoundStatus]) -> None:
        f = self._fleet
        for status in statuses:
            record = f.records.get(status.round_id)
            found = f.runs.round_of(status.round_id)
            if record is None or found is None:
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
            run = f.runs.get(found[0])
            assert run is not None  # round_of found it
            self._round_closed(run, found[1], status.round_id, completed)

    def collect(self) -> None:
        for outcome in self._aggregator.collect():
            self._on_aggregated(outcome)

    def settle(self) -> None:
        """Clusters whose canary has decided are done; a run whose clusters all are, too. An
        aggregation that never came back (a lost task) ends its cluster's training: no stage
        waits forever."""
        f = self._fleet
        now = f.clock()
        for run in f.runs.running(in_stage=(ClusterStage.AGGREGATING, ClusterStage.ROLLING_OUT)):
            changed = False
            for c in run.in_stage(ClusterStage.AGGREGATING):
                if now - (c.aggregating_since or now) > AGGREGATION_TIMEOUT_S:
                    log.warning("run %s cluster %s: %s", run.run_id, c.cluster, AGGREGATION_LOST)
                    self._stop(c, c.progress.best_measured(), AGGREGATION_LOST)
                    changed = True
            if changed and not run.in_stage(ClusterStage.AGGREGATING):
                self._aggregation_timed_out(run, now)
                self._advance(run)
            for c in run.in_stage(ClusterStage.ROLLING_OUT):
                rollout = f.rollouts.get(c.rollout_id) if c.rollout_id else None
                if rollout is not None and rollout.is_decided:
                    c.stage, c.note = ClusterStage.DONE, f"{rollout.state}: {rollout.reason}"
                    changed = True
            if changed:
                self._finish_if_done(run)
                f.runs.save(run)

    def _aggregation_timed_out(self, run: Run, now: float) -> None:
        """The round whose last aggregations never came back ends: STORED if a cluster stored
        an aggregate of it, FAILED if none did (its record left AGGREGATING for good before)."""
        f = self._fleet
        round_id = run.rounds[-1]
        record = f.records.get(round_id)
        if record is None or record.stage is not RoundStage.AGGREGATING:
            return
        if record.adapter_version is not None:
            f.records.settle(round_id, RoundStage.STORED, now)
            self._finished(round_id, RoundResult.COMPLETED)
        else:
            f.records.aggregation_failed(round_id, AGGREGATION_LOST, now)
            self._finished(round_id, RoundResult.FAILED)

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
        for run in f.runs.running():
            round_id = run.rounds[-1] if run.rounds else None
            for c in run.in_stage(ClusterStage.AGGREGATING):
                assert round_id is not None  # a cluster aggregates only after a round
                if f"{round_id}/{c.cluster}" not in pending:
                    log.info("run %s: resuming cluster %s's aggregation", run.run_id, c.cluster)
                    self._aggregate(run, c, run.round_index, round_id)
            last = f.records.get(round_id) if round_id else None
            idle = last is None or last.stage not in (RoundStage.RUNNING, RoundStage.AGGREGATING)
            if idle and not run.in_stage(ClusterStage.AGGREGATING):
                self._advance(run)  # crashed between a round's end and the next step

    def release_ended(self) -> int:
        """Drops the arrays of reports whose round has ended that still hold them (None: reports
        outside any round), and the files of rounds this state db has no record of (the state db
        replaced, or restored from an older copy), up to RELEASE_PER_SCAN reports held
        in rows or memory a call; returns how many. A round's end releases its own; these are
        the rest: a report that came after its round ended, the arrays an earlier version kept
        of every round. (All at once, a state dir with hundreds of rounds' arrays in rows held
        up a scan for many seconds: ~0.08 s for 10,000 reports. A round's file is one unlink.)"""
        f = self._fleet
        released = 0
        for round_id in sorted(f.reports.rounds_holding_arrays(), key=str):
            if round_id is not None:
                record = f.records.get(round_id)
                unknown = record is None and f.rounds.get(round_id) is None
                if not unknown and (record is None or record.stage in ACTIVE_STAGES):
                    continue
            released += f.reports.release(round_id)
            if released >= RELEASE_PER_SCAN:
                break
        return released

    # ---- internals: starting

    def _start_run(
        self, cohort: str, records: list[DeviceRecord], trigger: str, skipped: dict[str, str]
    ) -> dict[str, Any] | None:
        f = self._fleet
        active = f.runs.active(cohort)
        if active is not None:
            raise Conflict(f"cohort {cohort} has run {active.run_id} under way")
        rollout = f.rollouts.active(cohort)
        if rollout is not None:
            raise Conflict(f"cohort {cohort} has canary rollout {rollout.rollout_id} running")
        everyone = f.registry.devices(cohort)
        before = f.clusters.labelled_members(cohort, everyone)
        placed = f.clusters.recluster(cohort, everyone)
        self._invalidate_changed(cohort, before, f.clusters.labelled_members(cohort, everyone))
        self._set_references(cohort)
        cluster_of = {p.device_id: p for p in placed}
        trainers: dict[str, list[str]] = {}
        for record in records:
            placement = cluster_of.get(record.device_id)
            why = self._cannot_train(record, placement)
            if why is not None:
                skipped[record.device_id] = why
            else:
                assert placement is not None and placement.cluster is not None  # checked
                trainers.setdefault(placement.cluster, []).append(record.device_id)
        if not trainers:
            return None
        run = Run(
            run_id=uuid.uuid4().hex,
            cohort=cohort,
            trigger=trigger,
            started_at=f.clock(),
            clusters={
                cluster: ClusterRun(
                    cluster,
                    tuple(sorted(members)),
                    f.store.current_version(cohort, cluster) or 0,
                    RunProgress(f.runs.policy),
                )
                for cluster, members in sorted(trainers.items())
            },
        )
        round_id = self._start_round(run, skipped)
        # One line a round, with counts (the device ids at debug: a round may have thousands)
        sizes = {cluster: len(members) for cluster, members in trainers.items()}
        log.info("run %s (%s) on cohort %s: clusters of %s devices", run.run_id, trigger,
                 cohort, sizes)  # fmt: skip
        log.debug("run %s clusters: %s", run.run_id, trainers)
        return {
            "round_id": round_id,
            "run_id": run.run_id,
            "cohort": cohort,
            "devices": members_of(run, run.clusters.values()),
            "clusters": {c: list(m.members) for c, m in run.clusters.items()},
        }

    def _set_references(self, cohort: str) -> None:
        """Each member's label-free score now becomes what its next trigger is measured
        against (at a run's start and end): a drift that stays must not start run after run."""
        f = self._fleet
        signal = f.config.policy.label_free_signal
        for member in f.registry.devices(cohort):
            f.registry.set_label_free_reference(member.device_id, label_free_score(member, signal))

    def _invalidate_changed(
        self,
        cohort: str,
        before: Mapping[str, frozenset[str]],
        after: Mapping[str, frozenset[str]],
    ) -> None:
        """A cluster whose labelled members changed loses its current version: that version's
        canary was measured on other devices, and a device without labels must not get it on
        their word (a damaged-fan adapter on a normal fan). The run's own canary decides anew."""
        f = self._fleet
        for cluster, version in f.store.current_versions(cohort).items():
            if before.get(cluster) != after.get(cluster):
                f.store.set_current(cohort, None, cluster)
                log.info("cohort %s cluster %s: its members changed, v%d no longer current",
                         cohort, cluster, version)  # fmt: skip

    def _cannot_train(self, record: DeviceRecord, placement: Placement | None) -> str | None:
        f = self._fleet
        if not record.labelled:
            return "no labels: it runs what its cluster's canary passes"
        if not f.reachable(record):
            reason = f.scheduler.skip_reason(record, f.clock())
            assert reason is not None  # unreachable: skipped for a reason
            return f"not reachable ({reason.value})"
        if placement is None or placement.cluster is None:
            return f"in no cluster ({placement.how if placement else 'not placed'})"
        return None

    def _start_round(self, run: Run, skipped: dict[str, str] | None = None) -> str | None:
        """The next round over the training clusters' reachable members; a cluster with none
        left stops. None if nobody trains."""
        f = self._fleet
        index = run.round_index + 1
        starts = {}
        for c in run.in_stage(ClusterStage.TRAINING):
            here = [d for d in c.members if f.reachable(f.registry.get(d))]
            if not here:
                self._stop(c, c.progress.best_measured(), "no member reachable for a round")
            starts.update({d: c.start_of(index) for d in here})
        if not starts:
            f.runs.save(run)
            return None
        rnd = f.scheduler.start_round(sorted(starts))
        f.records.open(
            rnd.round_id,
            cohort=run.cohort,
            trigger=run.trigger,
            started_at=rnd.started_at,
            skipped=skipped or {},
        )
        f.runs.add_round(run, rnd.round_id, starts)
        log.info("run %s round %d (%s): %d devices", run.run_id, index, rnd.round_id, len(starts))
        log.debug("round %s devices: %s", rnd.round_id, sorted(starts))
        return rnd.round_id

    # ---- internals: a round's end

    def _round_closed(self, run: Run, index: int, round_id: str, completed: bool) -> None:
        f = self._fleet
        reports = {meta.device_id: meta for meta in f.reports.for_round(round_id)}
        record = f.records.get(round_id)
        assert record is not None  # opened with the round
        answered = set(record.answered or ())
        for c in run.in_stage(ClusterStage.TRAINING):
            mine = [d for d in c.members if d in answered and d in reports]
            if not completed or not mine:
                why = "the round failed" if not completed else "no member reported"
                self._stop(c, c.progress.best_measured(), why)
                continue
            decision = c.progress.record_round(measured_before(reports, mine))
            f.records.cluster_outcome(round_id, c.cluster, {"decision": decision.reason})
            if decision.next is Next.STOP:
                self._stop(c, decision.candidate, decision.reason)
            else:
                c.last_round = is_last(decision)
                self._aggregate(run, c, index, round_id)
        f.runs.save(run)
        if not completed:
            self._finished(round_id, RoundResult.FAILED)
        elif not run.in_stage(ClusterStage.AGGREGATING):
            f.records.settle(round_id, RoundStage.DONE, f.clock())
            self._finished(round_id, RoundResult.COMPLETED)
        if not run.in_stage(ClusterStage.AGGREGATING):
            self._advance(run)

    def _aggregate(self, run: Run, c: ClusterRun, index: int, round_id: str) -> None:
        f = self._fleet
        record = f.records.get(round_id)
        assert record is not None  # opened with the round
        request = aggregation_request(
            f, run, c, index, round_id, record.answered or (), record.failures or {}
        )
        if isinstance(request, str):
            self._stop(c, c.progress.best_measured(), request)
            return
        c.stage, c.aggregating_since = ClusterStage.AGGREGATING, f.clock()
        f.runs.save(run)
        self._aggregator.submit(request, algorithms_for(f.config.algorithm.value))

    def _on_aggregated(self, outcome: AggregationOutcome) -> None:
        f = self._fleet
        request = outcome.request
        for strategy_run in outcome.runs:
            f.events.record(AggregationTimed(strategy_run.algorithm, strategy_run.seconds))
        found = f.runs.round_of(request.round_id)
        run = None if found is None else f.runs.get(found[0])
        c = None if run is None else run.clusters.get(request.cluster)
        if found is None or run is None or c is None or c.stage is not ClusterStage.AGGREGATING:
            return  # resubmitted after a restart, and stored already
        chosen = outcome.run(f.config.algorithm.value)
        if chosen is None or chosen.result is None:
            error = chosen.error if chosen else "the configured strategy did not run"
            log.warning("round %s %s: aggregation failed: %s", request.round_id, c.cluster, error)
            f.records.cluster_outcome(request.round_id, c.cluster, {"error": error})
            self._stop(c, c.progress.best_measured(), f"aggregation failed: {error}")
        else:
            try:
                self._store(run, c, found[1], outcome, chosen.result)
            except AdapterStoreError as err:  # e.g. not finite: refused, the run goes on
                log.warning("run %s cluster %s: aggregate refused: %s", run.run_id, c.cluster, err)
                f.records.cluster_outcome(request.round_id, c.cluster, {"error": str(err)})
                self._stop(c, c.progress.best_measured(), f"aggregate refused: {err}")
        f.runs.save(run)
        if not run.in_stage(ClusterStage.AGGREGATING):
            f.records.settle(request.round_id, RoundStage.STORED, f.clock())
            self._finished(request.round_id, RoundResult.COMPLETED)
            self._advance(run)

    def _store(
        self,
        run: Run,
        c: ClusterRun,
        index: int,
        outcome: AggregationOutcome,
        result: AggregateResult,
    ) -> None:
        """Stores `result`, the configured strategy's aggregate in `outcome`."""
        f = self._fleet
        request = outcome.request
        # Stored already if the actor died right after saving: never two versions of one round.
        meta = next(
            (
                m
                for m in f.store.versions(run.cohort)
                if m.round_id == request.round_id and m.cluster == c.cluster
            ),
            None,
        ) or f.store.save(
            run.cohort,
            result.arrays,
            base_model_hash=request.base_model_hash,
            algorithm=result.algorithm,
            device_ids=result.device_ids,
            round_id=request.round_id,
            parent_version=request.parent_version,
            cluster=c.cluster,
        )
        c.aggregates[index] = meta.version
        f.records.stored(
            request.round_id,
            algorithm=result.algorithm,
            version=meta.version,
            weights=result.weights,
            failures={x.device_id: x.reason for x in result.failures},
            gap=aggregation_gap_view(outcome),
            at=f.clock(),
        )
        f.records.cluster_outcome(request.round_id, c.cluster, {"version": meta.version})
        log.info("run %s: cluster %s v%d from %d devices' reports", run.run_id, c.cluster,
                 meta.version, len(result.device_ids))  # fmt: skip
        if c.last_round:
            c.stage, c.candidate = ClusterStage.ROLLING_OUT, meta.version
            c.note = f"round budget of {f.runs.policy.max_rounds} used"
        else:
            c.stage = ClusterStage.TRAINING

    def _stop(self, c: ClusterRun, candidate_index: int | None, reason: str) -> None:
        c.candidate = None if candidate_index is None else c.aggregates.get(candidate_index)
        if c.candidate is None:
            c.stage, c.note = ClusterStage.DONE, f"{reason}; no aggregate beat the start"
        else:
            c.stage, c.note = ClusterStage.ROLLING_OUT, reason

    def _advance(self, run: Run) -> None:
        """After a round and its aggregations: the next round for the clusters still
        training, canaries for those that stopped, and the end of the run when nothing is
        left."""
        if run.in_stage(ClusterStage.TRAINING):
            self._start_round(run)
        for c in run.in_stage(ClusterStage.ROLLING_OUT):
            if c.rollout_id is None:
                assert c.candidate is not None  # rolling out: _stop or _store chose one
                rollout_id, note = self._distributor.start_canary(
                    run.cohort, c.cluster, c.candidate, exclude=c.outliers
                )
                c.rollout_id = rollout_id
                self._note_rollout(run, c, rollout_id, note)
                if rollout_id is None:
                    c.stage, c.note = ClusterStage.DONE, f"{c.note}; {note}"
        self._finish_if_done(run)
        self._fleet.runs.save(run)

    def _note_rollout(self, run: Run, c: ClusterRun, rollout_id: str | None, note: str) -> None:
        """The run's last round records where its clusters' candidates went."""
        records = self._fleet.records
        last = run.rounds[-1]
        records.rollout(last, rollout_id=rollout_id, note=note)
        records.cluster_outcome(last, c.cluster, {"rollout_id": rollout_id, "rollout": note})

    def _finish_if_done(self, run: Run) -> None:
        active = (ClusterStage.TRAINING, ClusterStage.AGGREGATING, ClusterStage.ROLLING_OUT)
        if run.state is RunState.RUNNING and not run.in_stage(*active):
            run.state, run.finished_at = RunState.DONE, self._fleet.clock()
            self._fleet.events.record(RunFinished(run.round_index))
            self._set_references(run.cohort)  # a drift still rising when it began is answered
            log.info("run %s done: %s", run.run_id, {c: x.note for c, x in run.clusters.items()})

    def _finished(self, round_id: str, result: RoundResult) -> None:
        f = self._fleet
        record = f.records.get(round_id)
        assert record is not None  # opened with the round
        f.events.record(RoundFinished(result, max(0.0, f.clock() - record.started_at)))
        f.reports.release(round_id)  # its aggregation, the only reader, is done
