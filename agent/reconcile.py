"""Desired state: run the adapter version the coordinator's retained pointer names, without a job.

The coordinator keeps a retained `DesiredState` on `{root}/{device}/cmd/desired`. The broker
hands it over at every subscribe, so a device that was offline learns the current version when
it comes back. If the version differs from the running adapter and the base model matches, the
agent asks for it (`FetchRequest` on `fetch`), waits for the `AdapterPublication` on
`cmd/adapter` (the inbox, chunks already joined) and installs it, keeping the adapter it ran
before for rollback. A version of None means: run the base model alone.

With `only_if_better` (a device with labels), the device measures the version on its own
hold-out against what it runs and takes it only if it measures better (agent/choice.py); a version
it declined is remembered and not fetched or measured again while the same adapter runs. A
device without labels cannot measure, and takes the version as is.

A pointer that carries an offer (a job id, DesiredState.apply_job) the device has not seen, not
expired, is handed to the job runner as that APPLY_ADAPTER job, which does the same and answers
with its one terminal status; the same pointer re-delivered later (at every reconnect) is
reconciled here, unanswered. An adapter carried inline was put in the inbox on arrival
(agent.downlink), so neither fetches it.

Waiting and asking again happen on the reconciler's own thread; the install (and the
comparison before it) is handed to the job runner's worker (`run_between_jobs`), so it never
overlaps a job that reads or replaces the adapter.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterSource, AdapterStore
from agent.choice import OwnChoice
from agent.local_data import LocalData
from agent.spool import SpoolFull
from agent.trainer.errors import AdapterError
from shared.mqtt import backoff_delay
from shared.protocol.messages import BASE_MODEL_VERSION, DesiredState, FetchRequest, Job

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FetchPolicy:
    """Ask, wait, ask again: waits drawn in [d/2, d] for d = retry × 2^k (at most `cap`)."""

    retry_seconds: float = 30.0
    max_fetches: int = 5
    cap_seconds: float = 600.0

    def wait(self, attempt: int, rng: random.Random) -> float:
        cap = max(self.cap_seconds, self.retry_seconds)
        return backoff_delay(attempt, base_s=self.retry_seconds, cap_s=cap, rng=rng)


class Refused(Exception):
    """The desired adapter cannot run here; asking again would not change that."""


class Reconciler:
    def __init__(
        self,
        *,
        data: LocalData,
        store: AdapterStore,
        inbox: AdapterInbox,
        send_fetch: Callable[[FetchRequest], None],
        between_jobs: Callable[[Callable[[], object]], Future],
        choice: OwnChoice,
        take_offer: Callable[[Job], bool] = lambda job: False,
        policy: FetchPolicy = FetchPolicy(),
        rng: random.Random | None = None,
    ):
        self._data = data
        self._store = store
        self._choice = choice
        self._inbox = inbox
        self._send_fetch = send_fetch
        self._between_jobs = between_jobs
        self._take_offer = take_offer
        self._policy = policy
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._changed = threading.Event()  # a new pointer arrived, or stop: wakes any wait
        self._pending: DesiredState | None = None
        self._working_on: DesiredState | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    # -- the transport's thread ---------------------------------------------------------------
    def offer(self, desired: DesiredState) -> None:
        """A pointer arrived (retained at subscribe, or live). Never blocks."""
        offered = desired.apply_job()
        taken = offered is not None and self._take_offer(offered)
        with self._lock:
            if desired == self._working_on:
                return  # re-delivered at a reconnect while being worked on: carry on
            # taken: the apply job does the work; whatever was pending is superseded
            self._pending = None if taken else desired
            self._changed.set()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._changed.wait()
            with self._lock:
                if self._stopping:
                    return
                desired, self._pending = self._pending, None
                self._working_on = desired
                self._changed.clear()
            try:
                if desired is not None:
                    self._reconcile(desired)
            except Exception:  # a bug must not end reconciling for good
                log.exception("desired state %s: reconcile failed", desired)
            finally:
                with self._lock:
                    self._working_on = None

    # -- the reconciler's thread --------------------------------------------------------------
    def _reconcile(self, desired: DesiredState) -> None:
        own = self._data.model.weights_hash
        if desired.base_model_hash != own:
            log.error(
                "desired adapter %s refused: it is for base model %s, this device runs %s",
                desired.adapter_version,
                desired.base_model_hash[:16],
                own[:16],
            )
            return
        version = desired.adapter_version
        if self._runs(version):
            log.debug("desired adapter %s is running already", version)
            return
        judged = desired.only_if_better and self._data.current().learner.labelled
        if judged and self._choice.declined(_candidate(version)):
            log.debug("desired adapter %s declined before against what runs: not again", version)
            return
        try:
            arrays = None if version is None else self._obtain(version)
        except Refused as err:
            log.error("desired adapter %s refused: %s", version, err)
            return
        if version is None or arrays is not None:
            self._install(version, arrays, judged)

    def _runs(self, version: int | None) -> bool:
        current = self._store.current
        if version is None:
            return current is None
        return current is not None and current.meta.version == version

    def _obtain(self, version: int) -> Arrays | None:
        """The arrays of `version`, asked for as often as the policy allows; None if not."""
        for attempt in range(self._policy.max_fetches):
            arrays = self._at_hand(version)
            if arrays is not None:
                return arrays
            if self._changed.is_set():
                return None  # a newer pointer (or stop) takes over
            wait = self._policy.wait(attempt, self._rng)
            self._ask(version, attempt, wait)
            self._inbox.wait_for(version, wait, cancel=self._changed)
        arrays = self._at_hand(version)
        if arrays is None and self._changed.is_set():
            return None
        if arrays is None:
            log.warning(
                "desired adapter %d did not arrive after %d requests; waiting for the next "
                "desired pointer (one comes with every reconnect)",
                version,
                self._policy.max_fetches,
            )
        return arrays

    def _at_hand(self, version: int) -> Arrays | None:
        stored = self._store.find(version)  # e.g. the previous adapter
        if stored is not None:
            return stored.arrays
        publication = self._inbox.get(version)
        if publication is None:
            return None
        if publication.base_model_hash != self._data.model.weights_hash:
            raise Refused(f"the publication is for base model {publication.base_model_hash[:16]}")
        try:
            self._data.current().learner.adapter(publication.arrays)
        except AdapterError as err:
            raise Refused(f"its arrays do not fit the model: {err}") from None
        return publication.arrays

    def _ask(self, version: int, attempt: int, wait: float) -> None:
        log.info(
            "desired adapter %d: asking for it (request %d of %d), waiting up to %.1f s",
            version,
            attempt + 1,
            self._policy.max_fetches,
            wait,
        )
        try:
            self._send_fetch(FetchRequest(version))
        except SpoolFull as err:  # the wait still runs: the adapter may come anyway
            log.error("desired adapter %d: fetch request not spooled: %s", version, err)

    def _install(self, version: int | None, arrays: Arrays | None, judged: bool) -> None:
        future = self._between_jobs(lambda: self._install_now(version, arrays, judged))
        while True:
            try:
                future.result(timeout=0.25)
                return
            except FutureTimeout:
                if self._stopping:  # a long job runs; the next start reconciles again
                    return
            except CancelledError:
                return

    def _install_now(self, version: int | None, arrays: Arrays | None, judged: bool) -> None:
        """On the job runner's worker, between jobs; `judged`: only if it measures better."""
        if self._runs(version):
            return  # an apply job got there first
        if judged and not self._wins(version, arrays):
            return
        if arrays is None:
            self._store.clear()
            log.info("desired state: running the base model alone (the adapter kept for rollback)")
            return
        self._store.install(
            arrays,
            version=version,
            base_model_hash=self._data.model.weights_hash,
            source=AdapterSource.COORDINATOR,
            details={"desired_state": True},
        )
        log.info("desired state: adapter version %d installed (the previous kept)", version)

    def _wins(self, version: int | None, arrays: Arrays | None) -> bool:
        learner = self._data.current().learner
        verdict = self._choice.judge(learner, _candidate(version), learner.adapter(arrays))
        log.info(
            "desired adapter %s: hold-out accuracy %.4f (loss %.4f) against %.4f (%.4f) of what "
            "runs (%s): %s",
            version,
            verdict.candidate.accuracy,
            verdict.candidate.loss,
            verdict.running.accuracy,
            verdict.running.loss,
            self._store.origin.value,
            "installing it" if verdict.better else "declined, keeping what runs",
        )
        return verdict.better


def _candidate(version: int | None) -> int:
    """The version a decline is remembered under (the base model alone: 0)."""
    return BASE_MODEL_VERSION if version is None else version
