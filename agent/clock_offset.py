"""How far this device's clock is from the coordinator's, from the messages it receives.

Every coordinator message carries its sent time (the envelope's `sent_at`, coordinator clock).
Received at local time t, it gives t - sent_at = offset + transit delay, and the delay is never
negative: so the smallest recent sample is the best estimate (the message that waited least),
and a message that sat in the broker's queue only makes its own sample larger. Retained messages
(the desired-state pointer) can be hours old and are not used.

The offset is device clock minus coordinator clock: +3600 for a device an hour ahead. Job
expiry is judged on `coordinator_now()` (the local clock minus the offset), so a device whose
clock is wrong neither rejects every job as expired nor runs stale ones. Samples are kept for
WINDOW_SECONDS (by the monotonic clock): a device clock that NTP steps is believed again then.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 600.0
MAX_SAMPLES = 64


class ClockOffset:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        window_seconds: float = WINDOW_SECONDS,
    ):
        self._clock = clock
        self._monotonic = monotonic
        self._window = window_seconds
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._lock = threading.Lock()

    def observe(self, sent_at: float) -> None:
        """A coordinator message stamped `sent_at` (its clock) arrived now."""
        with self._lock:
            self._samples.append((self._monotonic(), self._clock() - sent_at))

    def offset(self) -> float | None:
        """Device clock minus coordinator clock in seconds; None before any message arrived."""
        with self._lock:
            horizon = self._monotonic() - self._window
            while len(self._samples) > 1 and self._samples[0][0] < horizon:
                self._samples.popleft()  # the latest stays: an estimate, though old
            return min((s for _, s in self._samples), default=None)

    def coordinator_now(self) -> float:
        """The coordinator's clock as this device estimates it (its own before any estimate)."""
        offset = self.offset()
        return self._clock() - (0.0 if offset is None else offset)
