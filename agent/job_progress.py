"""A job's IN_PROGRESS statuses: sent only when they tell the coordinator something.

A job that ends within `after_s` of its arrival sends its end alone: the coordinator learns
nothing from an IN_PROGRESS followed a moment later by the result (its job table lets QUEUED
end directly). A job still unfinished `after_s` after it arrived sends IN_PROGRESS then (or
when it starts, if it waited that long behind another job), and afterwards its progress at
most every `interval_s`, with the fraction done.

Timing is on the job runner's clock (the coordinator's, as the device estimates it). The
notice is sent from a timer thread for a handler that reports no progress (waiting for an
adapter); `end` is called before the terminal status goes out, under the same lock, so an
IN_PROGRESS never follows its job's end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from shared.protocol.enums import JobState
from shared.protocol.messages import JobStatus


class ProgressNotice:
    def __init__(
        self,
        job_id: str,
        emit: Callable[[JobStatus], None],
        *,
        arrived_at: float,
        after_s: float,
        interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._job_id = job_id
        self._emit = emit
        self._due = arrived_at + after_s
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ended = False
        self._last_sent: float | None = None
        self._fraction = 0.0
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        """The job starts now: IN_PROGRESS at once if it is due, else a timer for when it is."""
        delay = self._due - self._clock()
        if delay <= 0:
            self._send()
            return
        self._timer = threading.Timer(delay, self._send, kwargs={"first": True})
        self._timer.daemon = True
        self._timer.start()

    def progress(self, fraction: float) -> None:
        """The handler's progress (0..1); sent if due and the last one is `interval_s` old."""
        now = self._clock()
        with self._lock:
            self._fraction = min(1.0, max(0.0, fraction))
            if now < self._due:
                return
            if self._last_sent is not None and now - self._last_sent < self._interval:
                return  # a status per epoch would flood the spool
        self._send()

    def end(self) -> None:
        """The job ended: nothing more is sent (call before its terminal status goes out)."""
        with self._lock:
            self._ended = True
        if self._timer is not None:
            self._timer.cancel()

    @property
    def sent(self) -> bool:
        return self._last_sent is not None

    def _send(self, first: bool = False) -> None:
        """`first`: the timer's, sent only if nothing was sent yet (progress got there first)."""
        with self._lock:
            if self._ended or (first and self._last_sent is not None):
                return
            self._last_sent = self._clock()
            self._emit(JobStatus(self._job_id, JobState.IN_PROGRESS, progress=self._fraction))
