"""Getting cluster adapters onto devices: canary, per-device offers, promotion, catching up.

What a device runs changes only when the candidate measures better on its own hold-out than
what it runs now. So a device with labels is never *given* an adapter: it is *offered* one
(APPLY_ADAPTER and the desired pointer with only_if_better) and installs it only if it measures
strictly better than its personal adapter, its current fleet adapter or the base model. A device
without labels cannot measure: it takes its cluster's adapter only after the cluster's canary
passed, which is measured on the cluster's labelled members (at least min_canaries of them:
never one device's word alone), and (by default) only if its own label-free scores say it
drifted: an adapter is no fix for a device that is not broken.

A canary never switches adapter: it gets two EVALUATE jobs, one for the candidate version
(evaluated on its hold-out without installing it) and one for the cluster's current version (or
the base model alone before the first), and the RolloutManager compares them. Devices that were
offline, joined later, drifted later, or failed to apply, are caught up by reconcile().
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator.adapter_store import WHOLE_COHORT, AdapterStoreError
from coordinator.clusters import CohortClusters
from coordinator.commands import COMMAND_KINDS, CanaryRole, CommandRecord
from coordinator.config import LabelFreeRollout
from coordinator.fleet import Conflict, Fleet, NotFound
from coordinator.jobs import Job, JobState
from coordinator.observations import RolloutDecided, RolloutResult
from coordinator.outbound import desired, evaluate_job
from coordinator.registry import DeviceRecord
from coordinator.rollout import Rollout, RolloutError, RolloutState
from coordinator.scheduler import label_free_score
from shared.protocol import BASE_MODEL_VERSION, AdapterOrigin, JobKind, JobStatus

log = logging.getLogger(__name__)

OFFER_INSTALLED, OFFER_DECLINED, OFFER_FAILED = "installed", "declined", "failed"
# A calibrated label-free score above this says the device's inputs drifted: 1.0 is the
# threshold calibrated for the base model on its own in-distribution data.
DRIFTED_SCORE = 1.0


class AdapterDistributor:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._batch_views: dict[str, CohortClusters] = {}  # cohort -> the ingest batch's

    # ---- canary

    def start_canary(
        self, cohort: str, cluster: str, version: int, *, exclude: Sequence[str] = ()
    ) -> tuple[str | None, str]:
        """Starts the candidate's canary on the cluster's labelled members (not those in
        `exclude`: devices whose reports were outliers); returns (rollout id or None, what
        happened). Without enough of them, the labelled members are still offered the
        candidate: they measure it themselves."""
        f = self._fleet
        able = [
            r.device_id
            for r in self._members(cohort, cluster)
            if r.labelled and f.reachable(r) and r.device_id not in exclude
        ]
        try:
            rollout = f.rollouts.start(cohort, version, able, cluster=cluster)
        except RolloutError as err:
            log.warning("cohort %s cluster %s v%d: no canary: %s", cohort, cluster, version, err)
            offered = self._offer_cluster(cohort, cluster, version, labelled_only=True)
            return None, f"no canary ({err}); offered to {len(offered)} labelled member(s)"
        reference = f.store.current_version(cohort, cluster) or BASE_MODEL_VERSION
        for device in rollout.canary_devices:
            record = f.registry.require(device)
            f.send_adapter(device, cohort, version)
            for role, evaluated in (
                (CanaryRole.CANDIDATE, version),
                (CanaryRole.CURRENT, reference),
            ):
                job = f.create_job(device, JobKind.EVALUATE.value, trigger="canary")
                f.commands.add(
                    CommandRecord(job.job_id, device, JobKind.EVALUATE, evaluated,
                                  job.created_at, rollout_id=rollout.rollout_id, role=role)
                )  # fmt: skip
                f.send(device, evaluate_job(job, evaluated, record.base_model_hash))
        canaries = ", ".join(rollout.canary_devices)
        log.info("cohort %s cluster %s v%d: canary on %d devices", cohort, cluster, version,
                 len(rollout.canary_devices))  # fmt: skip
        log.debug("rollout %s canaries: %s", rollout.rollout_id, canaries)
        return rollout.rollout_id, f"canary on {canaries}"

    def on_job_finished(self, job: Job, status: JobStatus | None) -> None:
        """A command job reached a terminal state (from its device, or timed out here)."""
        if job.kind not in COMMAND_KINDS:  # a fine-tune: never in the command log, not read
            return
        command = self._fleet.commands.get(job.job_id)
        if command is None:
            return
        succeeded = job.state is JobState.SUCCEEDED
        if command.kind is JobKind.APPLY_ADAPTER:
            self._on_applied(command, succeeded, job, status)
        elif succeeded:
            self._on_evaluated(command, _accuracy(status))
        elif command.rollout_id is not None:
            reason = f"evaluation {job.state}" + (f": {job.detail}" if job.detail else "")
            self._decide(
                command.rollout_id,
                lambda r: self._fleet.rollouts.record_failure(r, command.device_id, reason),
            )

    def check_deadlines(self) -> None:
        for rollout in self._fleet.rollouts.check_deadlines():
            self._decided(rollout)

    # ---- operator decisions

    def evaluate(self, device_ids: Sequence[str], version: int | None = None) -> dict[str, Any]:
        """Each reachable device measures on its own hold-out the adapter it runs (recorded in
        the registry: `GET /devices`), or the cohort's `version` (0: the base model alone)."""
        f = self._fleet
        sent, skipped = [], {}
        for device in device_ids:
            record = f.registry.get(device)
            why = _cannot_evaluate(f, record)
            if why is not None:
                skipped[device] = why
                continue
            assert record is not None  # _cannot_evaluate refuses an unknown device
            job = f.create_job(device, JobKind.EVALUATE.value, trigger="operator")
            f.commands.add(
                CommandRecord(job.job_id, device, JobKind.EVALUATE, version, job.created_at)
            )
            f.send(device, evaluate_job(job, version, record.base_model_hash))
            sent.append({"device": device, "job_id": job.job_id})
        return {"evaluating": sent, "skipped": skipped}

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        f = self._fleet
        meta = f.store.meta(cohort, version)
        if meta is None:
            raise NotFound(f"cohort {cohort} has no adapter version {version}")
        running = f.rollouts.active(cohort, meta.cluster)
        if running is not None:
            raise Conflict(
                f"cluster {meta.cluster} has canary rollout {running.rollout_id} running"
            )
        rejected = self._rolled_back(cohort, version)
        if rejected is not None and not force:
            # A canary measured it worse than what the cluster ran: promoting it anyway can
            # take devices that cannot measure to a bad adapter. Only on an explicit force.
            raise Conflict(
                f"cohort {cohort} v{version}: its canary rollout {rejected.rollout_id} rolled it "
                f'back ({rejected.reason}); send {{"force": true}} to promote it anyway'
            )
        if rejected is not None:
            log.warning("cohort %s v%d promoted by force over its canary", cohort, version)
        f.store.set_current(cohort, version, meta.cluster)
        f.events.record(RolloutDecided(RolloutResult.PROMOTED))
        return {
            "cohort": cohort,
            "cluster": meta.cluster,
            "current_version": version,
            "devices": self.distribute(cohort, meta.cluster),
        }

    def _rolled_back(self, cohort: str, version: int) -> Rollout | None:
        """The rollout whose canary rolled this version back, if one did."""
        for rollout in self._fleet.rollouts.history(cohort):
            if rollout.candidate_version == version and rollout.state is RolloutState.ROLLED_BACK:
                return rollout
        return None

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        f = self._fleet
        current = f.store.current_versions(cohort)
        if cluster is None:
            if len(current) != 1:
                which = ", ".join(current) or "none has a version"
                raise Conflict(f"cohort {cohort}: say which cluster to roll back ({which})")
            cluster = next(iter(current))
        if cluster not in current:
            raise Conflict(f"cohort {cohort} cluster {cluster} runs no fleet adapter")
        meta = f.store.meta(cohort, current[cluster])
        parent = None if meta is None else meta.parent_version
        if parent is None:
            # The agent cannot be told to drop its adapter for the bare base model.
            raise Conflict(
                f"cohort {cohort} cluster {cluster} v{current[cluster]} has no parent version"
            )
        f.store.set_current(cohort, parent, cluster)
        f.events.record(RolloutDecided(RolloutResult.ROLLED_BACK))
        log.info("cohort %s cluster %s rolled back to v%d", cohort, cluster, parent)
        return {
            "cohort": cohort,
            "cluster": cluster,
            "current_version": parent,
            "devices": self.distribute(cohort, cluster),
        }

    # ---- distribution

    def distribute(self, cohort: str, cluster: str) -> list[str]:
        """Offers the cluster's current version to every member (see the module doc)."""
        version = self._fleet.store.current_version(cohort, cluster)
        if version is None:
            return []
        return self._offer_cluster(cohort, cluster, version, labelled_only=False)

    def reconcile(self) -> None:
        """Places devices not yet in a cluster, and offers each cluster's current version to
        members that were not offered it: offline at promotion, joined or drifted later, or
        whose apply failed (after a back-off)."""
        f = self._fleet
        now = f.clock()
        for cohort, records in f.registry.by_cohort().items():
            current = f.store.current_versions(cohort)
            view = CohortClusters(f.clusters, cohort, functools.partial(tuple, records))
            for record in records:
                cluster = self._cluster_of(record, view)
                version = current.get(cluster) if cluster is not None else None
                if cluster is None or version is None or not self._due(record, version, now):
                    continue
                self._offer(record, version, cluster)

    def on_registered(self, record: DeviceRecord) -> None:
        """A device joined (or changed) its cohort: place it, and tell it what it should run."""
        if record.cohort is None:  # no presence yet: in no cohort to place it in
            return
        cluster = self._cluster_of(record, self._batch_view(record.cohort))
        version = self._fleet.store.current_version(record.cohort, cluster) if cluster else None
        if version is not None and cluster is not None:
            self._offer(record, version, cluster)

    def owes(self, record: DeviceRecord, view: CohortClusters | None = None) -> bool:
        """A device without labels that its cluster has an adapter for, not running it yet
        (placed now if it was not yet: a device that just joined is owed its cluster's).
        `view`: its cohort's clusters, read once for a pass over the cohort."""
        if record.labelled or record.cohort is None:
            return False
        cluster = self._cluster_of(record, view or self._view(record.cohort))
        if cluster is None:
            return False
        version = self._fleet.store.current_version(record.cohort, cluster)
        return version is not None and record.adapter_version != version

    def answer_fetch(self, device_id: str, version: int) -> None:
        f = self._fleet
        record = f.registry.get(device_id)
        if record is None or record.cohort is None:
            f.reject("unknown_device", f"fetch from {device_id}, who never sent its presence")
            return
        try:
            f.store.get(record.cohort, version, base_model_hash=record.base_model_hash)
        except AdapterStoreError as err:
            f.reject("unknown_adapter", f"fetch from {device_id}: {err}")
            return
        if f.adapter_waiting(device_id, record.cohort, version):
            return  # it goes out after this request anyway: a fetch repeated is not a copy more
        f.send_adapter(device_id, record.cohort, version)

    # ---- internals: offers

    def _offer_cluster(
        self, cohort: str, cluster: str, version: int, *, labelled_only: bool
    ) -> list[str]:
        sent = []
        busy = self._fleet.jobs.busy_devices()  # one read for the pass, not one a member
        for record in self._members(cohort, cluster):
            if labelled_only and not record.labelled:
                continue
            if self._offer(record, version, cluster, busy):
                sent.append(record.device_id)
        return sent

    def _offer(
        self, record: DeviceRecord, version: int, cluster: str, busy: set[str] | None = None
    ) -> bool:
        """Offers a version to one device; False if it is not for this device (yet). `busy`:
        the devices with an active job, read once for a pass (updated with this offer's job),
        else this device's are read here."""
        f = self._fleet
        measures = record.labelled
        if not measures and not self._takes_without_measuring(record):
            return False
        cohort, base_model_hash = _registered(record)
        applying = f.reachable(record) and not f.jobs.is_busy(record.device_id, busy)
        job = None
        if applying:
            job = f.create_job(record.device_id, JobKind.APPLY_ADAPTER.value, trigger="rollout")
            if busy is not None:
                busy.add(record.device_id)
            f.commands.add(
                CommandRecord(job.job_id, record.device_id, JobKind.APPLY_ADAPTER, version,
                              job.created_at)
            )  # fmt: skip
        # One message: the retained pointer, with the adapter inline (when small enough) and,
        # for a device that can answer now, the offer as an APPLY_ADAPTER job of its own; a
        # device that is away finds the pointer (and the adapter) when it comes back.
        f.send_desired(
            record.device_id,
            desired(version, base_model_hash, cohort, only_if_better=measures, offer=job),
        )
        if applying:  # an apply's answer settles the offer; reconcile() re-offers otherwise
            f.registry.set_offer(record.device_id, version, None)
        return True

    def _takes_without_measuring(self, record: DeviceRecord) -> bool:
        """A device without labels takes a promoted adapter always, or (the default) only when
        its calibrated label-free scores say it drifted."""
        config = self._fleet.config
        if config.label_free_rollout is LabelFreeRollout.ALWAYS:
            return True
        score = label_free_score(record, config.policy.label_free_signal)
        return score is not None and score > DRIFTED_SCORE

    def _due(self, record: DeviceRecord, version: int, now: float) -> bool:
        f = self._fleet
        if record.adapter_version == version or not f.reachable(record):
            return False
        if record.offered_version == version and record.offer_result != OFFER_FAILED:
            return False  # offered: installed, declined, or its answer is on the way
        if f.jobs.active(record.device_id):
            return False
        last = f.commands.last_apply(record.device_id, version)
        return last is None or now - last.created_at >= f.config.reapply_backoff_s

    def _members(self, cohort: str, cluster: str) -> list[DeviceRecord]:
        f = self._fleet
        members = f.clusters.clusters(cohort).get(cluster, ())
        return [r for d in members if (r := f.registry.get(d)) is not None]

    def _cluster_of(self, record: DeviceRecord, view: CohortClusters) -> str | None:
        """The device's cluster; one not placed yet (or placed nowhere for want of a
        signature it has now) is placed, by where its cluster members' signatures are now."""
        placement = view.placement(record.device_id)
        if placement is None or placement.cluster is None:
            if not view.members:
                return None
            placement = self._fleet.clusters.place(record, view)
        return placement.cluster

    def _view(self, cohort: str) -> CohortClusters:
        """The cohort's clusters for one device: read when needed, not kept."""
        f = self._fleet
        return CohortClusters(f.clusters, cohort, lambda: f.registry.devices(cohort),
                              one_by_one=True)  # fmt: skip

    def _batch_view(self, cohort: str) -> CohortClusters:
        """The cohort's clusters for the devices that join in one ingest batch, read once for
        it (forget_views ends it): per device, 1,000 joining a 6,000-device clustered cohort
        cost 21 ms of CPU each. The devices placed earlier in the batch are not among its
        members nor in its centroids (a labelled one would have moved its cluster's by 1/n)."""
        view = self._batch_views.get(cohort)
        if view is None:
            view = self._batch_views[cohort] = self._view(cohort)
        return view

    def forget_views(self) -> None:
        """An ingest batch ended (committed or rolled back): its cohorts' views are not kept."""
        self._batch_views.clear()

    # ---- internals: answers

    def _on_applied(
        self, command: CommandRecord, succeeded: bool, job: Job, status: JobStatus | None
    ) -> None:
        f, device, version = self._fleet, command.device_id, command.adapter_version
        if not succeeded:
            f.registry.set_offer(device, version, OFFER_FAILED)
            log.warning("%s did not apply v%s: %s %s", device, version, job.state, job.detail or "")
            return
        detail = dict(status.detail) if status is not None else {}
        # runs it: installed now, or already (the desired pointer got there first)
        installed = detail.get("installed", True) is not False or bool(
            detail.get("already_running")
        )
        cluster = self._version_cluster(f.registry.get(device), version)
        # The device measured both on its hold-out: what it runs now has the one it kept.
        measured = detail.get("accuracy_candidate" if installed else "accuracy_running")
        accuracy = _ratio(measured)
        if accuracy is not None:
            f.registry.record_accuracy(device, accuracy)
        if installed:
            why = _measured(f"runs {cluster} v{version}", detail)
            f.registry.set_running(device, version=version, origin="fleet", reason=why)
        else:
            # str(): the registry's TEXT column stores any value as text anyway
            origin = str(detail.get("origin") or AdapterOrigin.PERSONAL.value)
            why = _measured(f"keeps its {origin} adapter, declined {cluster} v{version}", detail)
            f.registry.set_running(
                device, version=_int_or_none(detail.get("adapter_version")), origin=origin,
                reason=why,
            )  # fmt: skip
        f.registry.set_offer(device, version, OFFER_INSTALLED if installed else OFFER_DECLINED)

    def _version_cluster(self, record: DeviceRecord | None, version: int | None) -> str:
        cluster = None
        if record is not None and record.cohort is not None and version is not None:
            cluster = self._fleet.store.cluster_of(record.cohort, version)
        cluster = cluster or WHOLE_COHORT
        return "the cohort's" if cluster == WHOLE_COHORT else f"cluster {cluster}'s"

    def _on_evaluated(self, command: CommandRecord, accuracy: float | None) -> None:
        f = self._fleet
        if accuracy is None:
            f.reject("invalid_status", f"evaluation {command.job_id} carries no accuracy")
            if command.rollout_id is not None:
                self._decide(
                    command.rollout_id,
                    lambda r: f.rollouts.record_failure(
                        r, command.device_id, "evaluation without an accuracy"
                    ),
                )
            return
        if command.role is None and command.adapter_version is None:  # what the device runs
            f.registry.record_accuracy(command.device_id, accuracy)
        if command.rollout_id is None:
            return
        f.commands.record_accuracy(command.job_id, accuracy)
        measured = f.commands.canary_accuracies(command.rollout_id, command.device_id)
        candidate, current = measured.get(CanaryRole.CANDIDATE), measured.get(CanaryRole.CURRENT)
        if candidate is not None and current is not None:
            self._decide(
                command.rollout_id,
                lambda r: f.rollouts.record_result(
                    r, command.device_id, accuracy_candidate=candidate, accuracy_current=current
                ),
            )

    def _decide(self, rollout_id: str, record: Callable[[str], Rollout | None]) -> None:
        """Records a canary outcome; acts if that decided the rollout (and not before)."""
        if not self._fleet.rollouts.is_undecided(rollout_id):
            return
        after = record(rollout_id)
        if after is not None and after.is_decided:
            self._decided(after)

    def _decided(self, rollout: Rollout) -> None:
        promoted = rollout.state is RolloutState.PROMOTED
        result = RolloutResult.PROMOTED if promoted else RolloutResult.ROLLED_BACK
        self._fleet.events.record(RolloutDecided(result))
        log.info(
            "rollout %s of %s cluster %s v%d: %s (%s)",
            rollout.rollout_id,
            rollout.cohort,
            rollout.cluster,
            rollout.candidate_version,
            rollout.state,
            rollout.reason,
        )
        if promoted:
            self.distribute(rollout.cohort, rollout.cluster)


def _registered(record: DeviceRecord) -> tuple[str, str]:
    """(cohort, base model hash) of a device in a cohort: its presence set both."""
    if record.cohort is None or record.base_model_hash is None:
        raise ValueError(f"device {record.device_id} has sent no presence: in no cohort")
    return record.cohort, record.base_model_hash


def _cannot_evaluate(fleet: Fleet, record: DeviceRecord | None) -> str | None:
    if record is None:
        return "unknown device"
    if not fleet.reachable(record):
        return "not reachable"
    if not record.labelled:
        return "no labels: it cannot measure accuracy"
    return None


def _measured(what: str, detail: Mapping[str, object]) -> str:
    candidate, running = detail.get("accuracy_candidate"), detail.get("accuracy_running")
    if isinstance(candidate, int | float) and isinstance(running, int | float):
        return f"{what}: {candidate:.3f} against {running:.3f} on its hold-out"
    return what


def _ratio(value: object) -> float | None:
    """The value as a float if it is a number in [0, 1] (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None  # NaN fails both


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _accuracy(status: JobStatus | None) -> float | None:
    if status is None:
        return None
    value = status.detail.get("accuracy")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None
