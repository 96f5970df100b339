"""A federated run: rounds over one cluster until the measured hold-out gain stops.

Round r trains every labelled member for a budget of SGD steps, warm-started from aggregate r−1
(the cluster's current adapter, or the base model, for r = 1), and aggregates the reports into
aggregate r. Each report's `accuracy_before` and `loss_before` measure the adapter its training
started from on that device's hold-out, so the reports of round r+1 measure aggregate r on every
member, at no extra cost. The run goes on while an aggregate gains at least `min_gain` accuracy
over the previous one, or lowers the hold-out cross-entropy by at least `min_loss_drop` of it
(paired over the devices that measured both): accuracy on a small hold-out saturates (a few
rows, all right) long before the adapter stops improving, and the loss keeps telling. It stops
after `patience` aggregates in a row that did neither, or after `max_rounds`; its candidate is
the best measured aggregate (accuracy, then loss), or the last one when the budget ran out (the
canary measures it).

Pure decisions over plain values: the coordinator's pipeline and the offline federation
benchmark both drive it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class FederationPolicy:
    max_rounds: int = 10
    # Stop when an aggregate's mean hold-out accuracy gains less than this (a fraction) over the
    # aggregate before it, paired over the devices that measured both.
    min_gain: float = 0.005
    min_loss_drop: float = 0.05  # ...or lowers the mean hold-out cross-entropy by this share
    patience: int = 2  # stop after this many aggregates in a row that gained too little
    steps: int = 50  # SGD steps each device runs per round: the same local work everywhere

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0.0 <= self.min_loss_drop < 1.0:
            raise ValueError(f"min_loss_drop must be in [0, 1), got {self.min_loss_drop}")


@dataclass(frozen=True)
class Measured:
    """One device's hold-out measurement of one aggregate."""

    accuracy: float
    loss: float


class Next(StrEnum):
    CONTINUE = "continue"  # aggregate this round's reports; the next round starts from them
    STOP = "stop"  # no more rounds: roll out `candidate` (None: nothing beat the start)


@dataclass(frozen=True)
class Decision:
    next: Next
    candidate: int | None = None  # the aggregate (round index, 1-based) to roll out
    reason: str = ""


@dataclass
class RunProgress:
    """What one cluster's run measured so far: per aggregate (0 = the start), per device."""

    policy: FederationPolicy
    measured: dict[int, dict[str, Measured]] = field(default_factory=dict)
    rounds_done: int = 0
    stalled: int = 0  # aggregates in a row that gained too little

    def record_round(self, before: Mapping[str, Measured]) -> Decision:
        """Round `rounds_done + 1` closed; `before` holds each answering device's hold-out
        measurement of the adapter it started from (aggregate `rounds_done`)."""
        self.measured[self.rounds_done] = dict(before)
        self.rounds_done += 1
        r = self.rounds_done - 1  # the aggregate this round measured
        if r >= 1:
            why = self._why_stalled(self.measured[r - 1], self.measured[r])
            self.stalled = 0 if why is None else self.stalled + 1
            if self.stalled >= self.policy.patience:
                return Decision(Next.STOP, self.best_measured(), f"aggregate {r}: {why}")
        if self.rounds_done >= self.policy.max_rounds:
            last = self.rounds_done
            return Decision(Next.CONTINUE, last, f"round budget of {self.policy.max_rounds} used")
        return Decision(Next.CONTINUE)

    def _why_stalled(
        self, before: Mapping[str, Measured], after: Mapping[str, Measured]
    ) -> str | None:
        both = sorted(set(before) & set(after))
        if not both:
            return "no device measured both it and the aggregate before"
        gain = sum(after[d].accuracy - before[d].accuracy for d in both) / len(both)
        loss_before = sum(before[d].loss for d in both) / len(both)
        loss_after = sum(after[d].loss for d in both) / len(both)
        drop = (loss_before - loss_after) / loss_before if loss_before > 0 else 0.0
        if gain >= self.policy.min_gain or drop >= self.policy.min_loss_drop:
            return None
        return f"accuracy gain {gain:+.4f}, loss drop {drop:+.1%}: too little"

    def best_measured(self) -> int | None:
        """The aggregate measured best (mean accuracy, then mean loss), if it beats the start."""
        means = {r: _mean(v) for r, v in self.measured.items() if v}
        if not means:
            return None
        best = max(sorted(means), key=lambda r: (means[r][0], -means[r][1]))
        start = means.get(0)
        beats = start is None or (means[best][0], -means[best][1]) > (start[0], -start[1])
        return best if best >= 1 and beats else None


def is_last(decision: Decision) -> bool:
    """CONTINUE with a candidate: aggregate this round, then stop (the budget is used up)."""
    return decision.next is Next.CONTINUE and decision.candidate is not None


def _mean(values: Mapping[str, Measured]) -> tuple[float, float]:
    n = len(values)
    return sum(m.accuracy for m in values.values()) / n, sum(m.loss for m in values.values()) / n
