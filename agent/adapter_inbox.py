"""Adapter versions received on `cmd/adapter`, held until a job applies or evaluates them.

Publications arrive on the transport's thread (pushed by the coordinator, or answering the
device's fetch request); jobs wait for them on the worker thread. Only the latest few versions
are kept: each is a few KiB, but a device has 512 MB and nothing to spare.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from shared.protocol.messages import AdapterPublication


class AdapterInbox:
    def __init__(self, capacity: int = 4, clock: Callable[[], float] = time.monotonic):
        self._capacity = capacity
        self._clock = clock
        self._by_version: OrderedDict[int, AdapterPublication] = OrderedDict()
        self._arrived = threading.Condition()

    def put(self, publication: AdapterPublication) -> None:
        with self._arrived:
            self._by_version.pop(publication.version, None)
            self._by_version[publication.version] = publication
            while len(self._by_version) > self._capacity:
                self._by_version.popitem(last=False)
            self._arrived.notify_all()

    def get(self, version: int) -> AdapterPublication | None:
        with self._arrived:
            return self._by_version.get(version)

    def wait_for(
        self, version: int, timeout: float, cancel: threading.Event | None = None
    ) -> AdapterPublication | None:
        """The publication of `version` once it is here; None after `timeout` or a cancel."""
        deadline = self._clock() + timeout
        with self._arrived:
            while version not in self._by_version:
                remaining = deadline - self._clock()
                if remaining <= 0 or (cancel is not None and cancel.is_set()):
                    return None
                self._arrived.wait(min(remaining, 0.25))  # wake to notice a cancel
            return self._by_version[version]
