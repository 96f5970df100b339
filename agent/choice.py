"""The device's own choice: run a candidate adapter only if it measures strictly better, on the
device's own hold-out, than what it runs now (a personal or fleet adapter, or the base model).

Used by APPLY_ADAPTER jobs and by the desired-state pointer when they say `only_if_better`.
A candidate that does not win is remembered (agent/declined.py), so the pointer, which comes
again at every reconnect, does not make the device fetch and measure it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.adapter_store import AdapterStore, StoredAdapter
from agent.declined import BASE_MODEL, DeclinedVersions
from agent.learner import Learner
from agent.trainer.adapter import Adapter


@dataclass(frozen=True)
class Verdict:
    accuracy_candidate: float
    accuracy_running: float

    @property
    def better(self) -> bool:
        return self.accuracy_candidate > self.accuracy_running


class OwnChoice:
    def __init__(self, store: AdapterStore, declined: DeclinedVersions):
        self._store = store
        self._declined = declined

    def judge(self, learner: Learner, version: int, candidate: Adapter | None) -> Verdict:
        """Measure `candidate` (fleet `version`; 0 the base model) against what runs now;
        remember it when it does not win. Call between jobs: what runs must not change."""
        running = self._store.current
        verdict = Verdict(
            accuracy_candidate=learner.holdout_accuracy(candidate),
            accuracy_running=learner.holdout_accuracy(
                learner.adapter(running.arrays if running else None)
            ),
        )
        if not verdict.better:
            self._declined.add(
                version, running_key(running), verdict.accuracy_candidate, verdict.accuracy_running
            )
        return verdict

    def declined(self, version: int) -> bool:
        """Whether `version` lost against what runs now already."""
        return self._declined.has(version, running_key(self._store.current))


def running_key(running: StoredAdapter | None) -> str:
    return BASE_MODEL if running is None else running.slot
