"""What a simulated device "sees": a sensor stream replaying its data, and the drift event.

- `SensorStream`: every heartbeat the device observes the next `rows` rows of its current
  data (cycling) and feeds them to the drift window, so the drift score follows what the device
  sees now. After a drift switch the stream continues from the first drifted row.
- `DriftTrigger`: switches the device to its drifted data `at_seconds` after start, or at once
  when asked (SIGUSR1). The switch is one-way; a running job finishes on the data it started with.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from agent.drift import RecentInputs
from agent.local_data import DataPhase, LocalData, SwitchResult

log = logging.getLogger(__name__)


class SensorStream:
    def __init__(self, data: LocalData, recent: RecentInputs, rows: int):
        if rows < 0:
            raise ValueError("rows must be >= 0")
        self._data = data
        self._recent = recent
        self._rows = rows
        self._phase: DataPhase | None = None
        self._cursor = 0

    def step(self) -> None:
        """Observe the next rows. Called from one thread only (the heartbeat loop)."""
        phase = self._data.current()
        if phase is not self._phase:
            self._phase, self._cursor = phase, 0
        stream = phase.stream
        if self._rows == 0 or len(stream) == 0:
            return
        rows = (self._cursor + np.arange(self._rows)) % len(stream)
        self._recent.add(stream[rows])
        self._cursor = int(rows[-1] + 1) % len(stream)


class DriftTrigger:
    def __init__(self, data: LocalData, at_seconds: float | None = None):
        self._data = data
        self._at_seconds = at_seconds
        self._requested = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="drift-trigger", daemon=True)

    def request(self) -> None:
        """Switch now. Safe in a signal handler: it only sets an event."""
        self._requested.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._requested.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        timeout = self._at_seconds
        while True:
            requested = self._requested.wait(timeout)
            if self._stopping:
                return
            self._requested.clear()
            self.switch("SIGUSR1" if requested else f"--drift-at {self._at_seconds:g} s")
            timeout = None  # --drift-at fires once

    def switch(self, why: str) -> SwitchResult:
        result = self._data.switch_to_drift()
        if result is SwitchResult.UNAVAILABLE:
            log.error("drift switch (%s) refused: the device data has no X_drift/y_drift", why)
        elif result is SwitchResult.ALREADY_DRIFTED:
            log.info("drift switch (%s): the device sees its drifted data already", why)
        else:
            phase = self._data.current()
            log.warning(
                "drift event (%s): the device now sees its drifted data (%d rows); fine-tuning "
                "and the hold-out use it from the next job",
                why,
                len(phase.stream),
            )
        return result
