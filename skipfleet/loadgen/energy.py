"""Energy of a simulated device: the agent's model meter formula (agent.meters.ModelMeter),
idle watts all the time plus (active − idle) watts while a fine-tune "runs"."""

from __future__ import annotations

from collections.abc import Callable

from agent.meters import PROFILES, PowerProfile, Scope

ENERGY_SCOPE = Scope.BOARD.value  # what the model meter's figures cover


class SimulatedEnergy:
    def __init__(self, profile: str, clock: Callable[[], float]) -> None:
        self.profile: PowerProfile = PROFILES[profile]
        self._clock = clock
        self._started = clock()
        self._busy_s = 0.0

    @property
    def label(self) -> str:
        """The power source reports and heartbeats carry, e.g. `model:rpi-zero-2w`."""
        return f"model:{self.profile.name}"

    def read_joules(self) -> float:
        p = self.profile
        wall = self._clock() - self._started
        return p.idle_watts * wall + (p.active_watts - p.idle_watts) * self._busy_s

    def busy(self, seconds: float) -> float:
        """Counts a fine-tune of `seconds` with one core busy; returns its joules."""
        self._busy_s += seconds
        return self.profile.active_watts * seconds
