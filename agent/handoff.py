"""The worker paho's callbacks hand their work to, so paho's network thread never blocks.

Accepting a job writes the job history (fsync), a rejection spools a status (SQLite commit), a
PUBACK deletes a spool row (SQLite commit): on an SD card any of these can take long enough to
stall keep-alive if done on the network thread. So the transport's callbacks only append to an
unbounded queue here (never blocks) and this thread runs the work, one item at a time, in the
order paho delivered the events (a PUBACK never overtakes the publish's connection event).
The queue stays small without a bound of its own: commands are acknowledged only after they
ran here, so the broker has at most its in-flight limit of them outstanding (mosquitto: 20),
and PUBACKs come for at most the outbox's window of publishes (16).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP = object()


class Handoff:
    def __init__(self, name: str = "mqtt-worker"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[..., object], *args: object) -> None:
        """Called from paho's thread: an append, nothing else."""
        self._queue.put((work, args))

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before this call has run; False on timeout."""
        done = threading.Event()
        self.submit(done.set)
        return done.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Runs what is queued so far, then ends the thread."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            work, args = item
            try:
                work(*args)
            except Exception:  # one bad message or ack must not end the worker
                log.exception("MQTT work item %s failed", getattr(work, "__name__", work))
