"""A simulated device's adapters: running and previous (agent.adapter_store, in memory) and the
inbox of versions received on `cmd/adapter` (agent.adapter_inbox), with waiters instead of a
blocking wait."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from shared.protocol.messages import AdapterPublication

INBOX_CAPACITY = 4  # as the agent: only the latest few versions are kept


@dataclass(frozen=True)
class Installed:
    version: int | None  # None: fine-tuned on the device, not a fleet version
    arrays: Mapping[str, np.ndarray]
    accuracy: float  # its real hold-out accuracy on this process's data
    source: str  # "finetune" or "coordinator", as the agent's AdapterSource


Waiter = Callable[[AdapterPublication], None]


class AdapterSlots:
    def __init__(self) -> None:
        self.running: Installed | None = None
        self.previous: Installed | None = None
        self._inbox: OrderedDict[int, AdapterPublication] = OrderedDict()
        self._waiters: dict[int, list[Waiter]] = {}

    @property
    def running_version(self) -> int | None:
        return self.running.version if self.running else None

    def runs(self, version: int | None) -> bool:
        if version is None:
            return self.running is None
        return self.running is not None and self.running.version == version

    def find(self, version: int) -> Installed | None:
        """The running or previous adapter if it has this fleet version."""
        for slot in (self.running, self.previous):
            if slot is not None and slot.version == version:
                return slot
        return None

    def install(self, adapter: Installed) -> None:
        self.previous, self.running = self.running, adapter

    def clear(self) -> None:
        """Run the base model alone; the adapter that ran is kept for rollback."""
        if self.running is not None:
            self.previous, self.running = self.running, None

    def rollback(self) -> Installed | None:
        """Swap running and previous; None (and nothing changes) without a previous one."""
        if self.previous is None:
            return None
        self.previous, self.running = self.running, self.previous
        return self.running

    # ---- the inbox

    def received(self, version: int) -> AdapterPublication | None:
        return self._inbox.get(version)

    def put(self, publication: AdapterPublication) -> None:
        self._inbox.pop(publication.version, None)
        self._inbox[publication.version] = publication
        while len(self._inbox) > INBOX_CAPACITY:
            self._inbox.popitem(last=False)
        for waiter in self._waiters.pop(publication.version, []):
            waiter(publication)

    def wait_for(self, version: int, waiter: Waiter) -> Callable[[], None]:
        """Calls `waiter` when this version arrives; returns a function that stops waiting."""
        self._waiters.setdefault(version, []).append(waiter)

        def stop() -> None:
            waiting = self._waiters.get(version, [])
            if waiter in waiting:
                waiting.remove(waiter)

        return stop
