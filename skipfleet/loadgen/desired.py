"""The retained desired pointer on a simulated device (the agent's agent.reconcile, on timers).

Another base model: refused and logged. The version runs already: nothing. None: run the base
model alone (the adapter kept for rollback). Otherwise the version is taken from the device's
slots or its inbox, or asked for with a FetchRequest, each wait drawn in [d/2, d] for
d = retry × 2^k (at most 600 s), at most `max_fetches` requests; the install waits for the job
runner to be between jobs. A newer pointer replaces one still being fetched; the same pointer
re-delivered meanwhile is ignored. A pointer offering a job the device has not seen (and not
expired) goes to the job runner as that APPLY_ADAPTER job instead, as the agent's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.reconcile import FetchPolicy
from agent.trainer.errors import AdapterError
from shared.protocol.messages import DesiredState, FetchRequest, Job
from skipfleet.loadgen.adapters import AdapterSlots, Installed
from skipfleet.loadgen.reference import Evaluator
from skipfleet.loadgen.timing import Cancellable, Timers

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


class _Refused(Exception):
    """The desired adapter cannot run here; asking again would not change that."""


@dataclass
class _Work:
    desired: DesiredState
    fetches: int = 0
    timer: Cancellable | None = None
    stop_waiting: Callable[[], None] | None = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.stop_waiting is not None:
            self.stop_waiting()


class DesiredReconciler:
    def __init__(
        self,
        *,
        base_model_hash: str,
        slots: AdapterSlots,
        evaluator: Evaluator,
        timers: Timers,
        send_fetch: Callable[[FetchRequest], None],
        between_jobs: Callable[[Callable[[], None]], None],
        on_install: Callable[[int | None, str], None],
        take_offer: Callable[[Job], bool],
        policy: FetchPolicy,
        rng: random.Random,
    ) -> None:
        self._hash = base_model_hash
        self._slots = slots
        self._evaluator = evaluator
        self._timers = timers
        self._send_fetch = send_fetch
        self._between_jobs = between_jobs
        self._on_install = on_install
        self._take_offer = take_offer
        self._policy = policy
        self._rng = rng
        self._work: _Work | None = None

    def offer(self, desired: DesiredState) -> None:
        """A pointer arrived (retained at subscribe, or live)."""
        offered = desired.apply_job()
        taken = offered is not None and self._take_offer(offered)
        if self._work is not None:
            if self._work.desired == desired and not taken:
                return  # re-delivered while being worked on: carry on
            self._work.stop()
            self._work = None
        if taken:
            return  # the apply job does the work, and answers
        self._work = _Work(desired)
        self._step(self._work)

    def _step(self, work: _Work) -> None:
        if work is not self._work:
            return  # replaced by a newer pointer
        work.stop()
        if not self._pursue(work):
            self._work = None

    def _pursue(self, work: _Work) -> bool:
        """One step towards the pointer; True while waiting for the adapter to arrive."""
        version = work.desired.adapter_version
        if work.desired.base_model_hash != self._hash:
            log.error("desired adapter %s refused: it is for another base model", version)
            return False
        if self._slots.runs(version):
            return False
        if version is None:
            self._install(None, None)
            return False
        try:
            arrays = self._at_hand(version)
        except _Refused as err:
            log.error("desired adapter %d refused: %s", version, err)
            return False
        if arrays is not None:
            self._install(version, arrays)
            return False
        if work.fetches >= self._policy.max_fetches:
            log.warning(
                "desired adapter %d did not arrive after %d requests", version, work.fetches
            )
            return False
        self._ask(work, version)
        return True

    def _ask(self, work: _Work, version: int) -> None:
        wait = self._policy.wait(work.fetches, self._rng)
        work.fetches += 1
        self._send_fetch(FetchRequest(version))
        work.stop_waiting = self._slots.wait_for(version, lambda _: self._step(work))
        work.timer = self._timers.call_later(wait, lambda: self._step(work))

    def _at_hand(self, version: int) -> Arrays | None:
        held = self._slots.find(version)
        if held is not None:
            return held.arrays
        publication = self._slots.received(version)
        if publication is None:
            return None
        if publication.base_model_hash != self._hash:
            raise _Refused("the publication is for another base model")
        try:
            self._evaluator.check(publication.arrays)
        except AdapterError as err:
            raise _Refused(f"its arrays do not fit the model: {err}") from None
        return publication.arrays

    def _install(self, version: int | None, arrays: Arrays | None) -> None:
        def install_now() -> None:
            if self._slots.runs(version):
                return  # an apply job got there first
            if version is None:
                self._slots.clear()
            else:
                accuracy = self._evaluator.version_accuracy(version, arrays)
                self._slots.install(Installed(version, arrays, accuracy, "coordinator"))
            self._on_install(version, "desired_state")

        self._between_jobs(install_now)
