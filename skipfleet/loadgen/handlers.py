"""What each job kind does on a simulated device (the agent's agent.handlers, without training).

A fine-tune waits the configured device seconds on a timer (its progress every 5 s, sent as the
agent's is: skipfleet.loadgen.jobs), then reports the process's reference adapter perturbed for
this device and job (one of the process's variants: skipfleet.loadgen.reference), with real
hold-out accuracies; the report is its SUCCEEDED. Evaluate, apply and rollback do what the agent
does, with real accuracies; a version the device does not hold is asked for with a FetchRequest
and waited for.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.learner import InvalidMethod, check_method
from agent.trainer.errors import AdapterError
from shared.protocol.enums import JobKind, JobReason
from shared.protocol.messages import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    FetchRequest,
    Message,
    Report,
    ReportMetrics,
)
from skipfleet.loadgen.adapters import AdapterSlots, Installed
from skipfleet.loadgen.energy import ENERGY_SCOPE, SimulatedEnergy
from skipfleet.loadgen.jobs import PROGRESS_INTERVAL_S, Handler, RunningJob
from skipfleet.loadgen.reference import Evaluator, ReferenceRun, device_samples
from skipfleet.loadgen.timing import Every, Timers

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
OnInstall = Callable[[int | None, str], None]  # (version, how) whenever the running one changes


@dataclass(frozen=True)
class HandlerSettings:
    device_seconds: float  # how long a simulated fine-tune "takes"
    fetch_timeout_s: float = 60.0


class SimHandlers:
    def __init__(
        self,
        *,
        device_index: int,
        reference: ReferenceRun,
        evaluator: Evaluator,
        slots: AdapterSlots,
        energy: SimulatedEnergy,
        timers: Timers,
        send: Callable[[Message], None],
        on_install: OnInstall,
        settings: HandlerSettings,
    ) -> None:
        self._index = device_index
        self._reference = reference
        self._evaluator = evaluator
        self._slots = slots
        self._energy = energy
        self._timers = timers
        self._send = send
        self._on_install = on_install
        self._settings = settings
        self._samples = device_samples(reference.samples, device_index)  # the same every job
        self.last_cache_bytes = 0  # Skip-Cache bytes of the last fine-tune, for heartbeats

    def table(self) -> dict[JobKind, Handler]:
        return {
            JobKind.FINETUNE: self.finetune,
            JobKind.EVALUATE: self.evaluate,
            JobKind.APPLY_ADAPTER: self.apply_adapter,
            JobKind.ROLLBACK_ADAPTER: self.rollback_adapter,
        }

    @property
    def base_model_hash(self) -> str:
        return self._reference.base_model_hash

    def running_accuracy(self) -> float:
        running = self._slots.running
        return running.accuracy if running else self._reference.accuracy_base

    # ---- fine-tune

    def finetune(self, run: RunningJob) -> None:
        try:
            check_method(run.job.params.method)
        except InvalidMethod as err:
            run.reject(JobReason.INVALID_PARAMS, str(err))
            return
        seconds = self._settings.device_seconds
        before = self.running_accuracy()
        done = self._timers.call_later(seconds, lambda: self._finetuned(run, before, seconds))
        started = self._timers.time()
        run.ends_by = started + seconds

        def report_progress() -> None:  # as the agent's trainer: the fraction done
            run.progress((self._timers.time() - started) / max(seconds, 1e-9))

        def cancelled() -> None:
            done.cancel()
            run.fail(JobReason.CANCELED, "cancelled while running")

        run.on_cancel(cancelled)
        # A fine-tune shorter than the progress interval ends before its first tick would
        if seconds >= PROGRESS_INTERVAL_S:
            run.on_end(Every(self._timers, PROGRESS_INTERVAL_S, report_progress).cancel)

    def _finetuned(self, run: RunningJob, before: float, seconds: float) -> None:
        if run.finished:
            return
        params, running = run.job.params, self._slots.running
        seed = _seed(self._index, params.seed)
        arrays, after = self._evaluator.variant(self._reference.arrays, seed)
        samples = self._samples
        if params.max_samples is not None:
            samples = min(samples, params.max_samples)
        joules = self._energy.busy(seconds)
        metrics = ReportMetrics(
            accuracy_before=before,
            accuracy_after=after,
            samples=samples,
            epochs=params.epochs,
            finetune_seconds=seconds,
            joules=joules,
            power_source=self._energy.label,
            cache_hit_rate=self._reference.cache_hit_rate,
            base_model_hash=self.base_model_hash,
            method=params.method,
            rank=int(arrays["A1"].shape[1]),  # the arrays' rank, whatever the job asked
        )
        parent = running.version if running else None
        self.last_cache_bytes = self._reference.cache_bytes
        installed = after >= before  # as the agent: only if not worse on its hold-out
        if installed:
            self._slots.install(Installed(None, arrays, after, "finetune"))
            self._on_install(None, "finetune")
        # last, as the agent: the report is the job's SUCCEEDED, and no status follows it
        self._send(Report(run.job.job_id, arrays, metrics, parent_adapter_version=parent))
        run.succeed(
            {
                "accuracy_before": before,
                "accuracy_after": after,
                "installed": installed,
                "joules": joules,
                "power_source": self._energy.label,
                "energy_scope": ENERGY_SCOPE,
                "seconds": seconds,
                "samples": samples,
            },
            reported=True,
        )

    # ---- evaluate, apply, roll back

    def evaluate(self, run: RunningJob) -> None:
        wanted = run.job.params.adapter_version

        def answer(version: int | None, accuracy: float) -> None:
            holdout = self._evaluator.holdout_samples
            run.succeed({"accuracy": accuracy, "adapter_version": version,
                         "holdout_samples": holdout})  # fmt: skip

        if wanted is None:  # what the device runs
            answer(self._slots.running_version, self.running_accuracy())
        elif wanted == BASE_MODEL_VERSION:  # the base model alone: a first version's reference
            answer(wanted, self._reference.accuracy_base)
        else:
            self._obtain(
                run,
                wanted,
                lambda arrays: answer(wanted, self._evaluator.version_accuracy(wanted, arrays)),
            )

    def apply_adapter(self, run: RunningJob) -> None:
        wanted = run.job.params.adapter_version
        if self._slots.runs(wanted):
            run.succeed({"adapter_version": wanted, "already_running": True})
            return

        def install(arrays: Arrays) -> None:
            accuracy = self._evaluator.version_accuracy(wanted, arrays)
            self._slots.install(Installed(wanted, arrays, accuracy, "coordinator"))
            self._on_install(wanted, "apply_adapter")
            run.succeed({"adapter_version": wanted, "accuracy": accuracy})

        self._obtain(run, wanted, install)

    def rollback_adapter(self, run: RunningJob) -> None:
        restored = self._slots.rollback()
        if restored is None:
            run.reject(JobReason.ADAPTER_UNAVAILABLE, "no previous adapter kept")
            return
        self._on_install(restored.version, "rollback_adapter")
        detail = {"adapter_version": restored.version, "accuracy": restored.accuracy}
        run.succeed({**detail, "source": restored.source})

    # ---- obtaining a version

    def _obtain(self, run: RunningJob, version: int, use: Callable[[Arrays], None]) -> None:
        """`use` the arrays of this version: held, received, or asked for and waited for."""
        held = self._slots.find(version)
        if held is not None:
            use(held.arrays)
            return
        received = self._slots.received(version)
        if received is not None:
            self._use_publication(run, received, use)
            return
        self._send(FetchRequest(version))
        timeout = self._settings.fetch_timeout_s

        def arrived(publication: AdapterPublication) -> None:
            if not run.finished:
                self._use_publication(run, publication, use)

        def timed_out() -> None:
            why = f"adapter version {version} did not arrive in {timeout:.0f} s"
            run.fail(JobReason.ADAPTER_UNAVAILABLE, why)

        stop_waiting = self._slots.wait_for(version, arrived)
        timer = self._timers.call_later(timeout, timed_out)
        run.on_end(stop_waiting)
        run.on_end(timer.cancel)
        run.on_cancel(
            lambda: run.fail(JobReason.CANCELED, "cancelled while waiting for the adapter")
        )

    def _use_publication(
        self, run: RunningJob, publication: AdapterPublication, use: Callable[[Arrays], None]
    ) -> None:
        if publication.base_model_hash != self.base_model_hash:
            why = f"adapter {publication.version} is for base model {publication.base_model_hash}"
            run.reject(JobReason.BASE_MODEL_MISMATCH, why)
            return
        try:
            use(publication.arrays)
        except AdapterError as err:
            run.reject(JobReason.MALFORMED, f"adapter does not fit the model: {err}")


def _seed(device_index: int, job_seed: int) -> int:
    """One perturbation per (device, job): the job seed comes from the coordinator."""
    digest = hashlib.sha256(f"{device_index}/{job_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
