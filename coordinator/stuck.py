"""Work that should have moved on and has not: what /health reports (and answers 503 for).

Every stage has a deadline and a way out (a round closes at its deadline, an aggregation stops
after AGGREGATION_TIMEOUT_S, a canary rolls back at its deadline), so anything found here past
its deadline plus a grace is a bug or a wedged part, not a slow device.
"""

from __future__ import annotations

from typing import Any

from coordinator.fleet import Fleet
from coordinator.pipeline import AGGREGATION_TIMEOUT_S
from coordinator.runs import ClusterStage

# Past its way out by this long: the tick that applies the deadline has had many chances.
STUCK_GRACE_S = 60.0


def stuck_work(fleet: Fleet) -> list[dict[str, Any]]:
    now = fleet.clock()
    late = now - STUCK_GRACE_S
    found = [
        _item("round", r.round_id, "RUNNING", r.deadline, "open past its deadline")
        for r in fleet.rounds.open_rounds()
        if r.deadline < late
    ]
    for run in fleet.runs.running(in_stage=(ClusterStage.AGGREGATING,)):
        for c in run.in_stage(ClusterStage.AGGREGATING):
            due = (c.aggregating_since or now) + AGGREGATION_TIMEOUT_S
            if due < late:
                why = f"cluster {c.cluster} aggregating past {AGGREGATION_TIMEOUT_S:.0f} s"
                found.append(_item("run", run.run_id, "AGGREGATING", due, why))
    found += [
        _item("rollout", r.rollout_id, "CANARY", r.deadline, "canary undecided past its deadline")
        for r in fleet.rollouts.overdue(before=late)
    ]
    return found


def _item(kind: str, ident: str, stage: str, due: float, why: str) -> dict[str, Any]:
    return {"kind": kind, "id": ident, "stage": stage, "due": due, "why": why}
