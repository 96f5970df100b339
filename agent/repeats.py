"""A job command whose id this device accepted before: the coordinator asking again.

The coordinator sends the commands of its open jobs again when the device comes back online and
when its own MQTT session was lost (coordinator.reask): a broker that crashed may have dropped
the device's result after acknowledging it. What the answer is depends on the job here:
- its end went out and is kept (agent.kept_results: a terminal status, or a fine-tune's
  report, which ends it): the kept publishes are spooled again, unchanged, so the coordinator
  applies them once;
- running: its IN_PROGRESS status (the one the coordinator has may be the one that was lost);
- queued, or finished with its result no longer kept: not answered here; the job runner
  rejects the repeat as a DUPLICATE that says the job's state, as before.
Runs where commands are handled (the MQTT worker, agent.handoff), never on paho's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.job_history import JobHistory
from agent.kept_results import KeptPublish, KeptResults
from agent.spool import SpoolFull
from agent.uplink import Uplink
from shared.protocol.enums import JobState
from shared.protocol.messages import Job, JobStatus

log = logging.getLogger(__name__)


class RepeatedJobs:
    def __init__(
        self,
        history: JobHistory,
        kept: KeptResults,
        uplink: Uplink,
        emit: Callable[[JobStatus], None],
    ):
        self._history = history
        self._kept = kept
        self._uplink = uplink
        self._emit = emit

    def answer(self, job: Job) -> bool:
        """True if the command was a repeat answered here; False for the job runner to take
        (a new job, or a repeat it rejects as a duplicate)."""
        record = self._history.get(job.job_id)
        if record is None:
            return False
        kept = self._kept.of(job.job_id)
        if kept:  # its end went out: a terminal status, or a fine-tune's report (which ends it)
            self._send_again(job.job_id, record.state, kept)
            return True
        if record.state is JobState.IN_PROGRESS:
            log.info("job %s asked again while it runs: IN_PROGRESS", job.job_id)
            self._emit(JobStatus(job.job_id, JobState.IN_PROGRESS))
            return True
        return False

    def _send_again(self, job_id: str, state: JobState, kept: list[KeptPublish]) -> None:
        try:
            self._uplink.send_again(kept)
        except SpoolFull as err:  # asked again at the next reconnect; nothing to do now
            log.error("job %s (%s) asked again: its result not spooled: %s", job_id, state, err)
            return
        log.info("job %s asked again: its %s result sent again (%d publishes)", job_id,
                 state.value, len(kept))  # fmt: skip
