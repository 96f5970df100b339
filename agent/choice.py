"""The device's own choice: run a candidate adapter only if it measures better, on the device's
own hold-out, than what it runs now (a personal or fleet adapter, or the base model): higher
accuracy, or the same accuracy and a lower cross-entropy (agent/trainer/evaluation.py).

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
from agent.trainer.evaluation import Measure


@dataclass(frozen=True)
class Verdict:
    candidate: Measure
    running: Measure

    @property
    def better(self) -> bool:
        return self.candidate.better_than(self.running)

    def detail(self) -> dict[str, float]:
        """For a job's SUCCEEDED detail."""
        return {
            "accuracy_candidate": self.candidate.accuracy,
            "accuracy_running": self.running.accuracy,
            "loss_candidate": self.candidate.loss,
            "loss_running": self.running.loss,
        }


class OwnChoice:
    def __init__(self, store: AdapterStore, declined: DeclinedVersions):
        self._store = store
        self._declined = declined

    def judge(self, learner: Learner, version: int, candidate: Adapter | None) -> Verdict:
        """Measure `candidate` (fleet `version`; 0 the base model) against what runs now;
        remember it when it does not win. Call between jobs: what runs must not change."""
        running = self._store.current
        verdict = Verdict(
            candidate=learner.holdout_measure(candidate),
            running=learner.holdout_measure(learner.adapter(running.arrays if running else None)),
        )
        if not verdict.better:
            self._declined.add(
                version, running_key(running), verdict.candidate.accuracy, verdict.running.accuracy
            )
        return verdict

    def declined(self, version: int) -> bool:
        """Whether `version` lost against what runs now already."""
        return self._declined.has(version, running_key(self._store.current))


def running_key(running: StoredAdapter | None) -> str:
    return BASE_MODEL if running is None else running.slot
