"""Energy meters: one monotone cumulative reading, `read_joules()`, whatever the source.

The energy of an interval is the difference of two readings (`EnergyWindow`): that is how a
fine-tune's joules and a heartbeat's mean power are both measured. `agent.power` picks the meter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

log = logging.getLogger(__name__)


class PowerSource(Enum):
    INA219_I2C = "ina219-i2c"
    INA2XX_HWMON = "ina2xx-hwmon"
    RAPL = "rapl"
    HWMON = "hwmon"
    MODEL = "model"


class Scope(Enum):
    """What the figure covers: compare joules only between equal scopes."""

    BOARD = "board"  # the whole device's supply
    CPU_PACKAGE = "cpu-package"
    SENSOR = "sensor"  # whatever a generic hwmon sensor measures (often one rail)


@dataclass(frozen=True)
class PowerProfile:
    name: str
    idle_watts: float  # the board doing nothing
    active_watts: float  # the board with one core busy fine-tuning
    origin: str  # where the figures come from: read before trusting them


RPI_ZERO_2W = PowerProfile(
    name="rpi-zero-2w",
    idle_watts=0.60,
    active_watts=1.455,
    origin=(
        "active: the Skip2-LoRA paper's maximum while fine-tuning on a Raspberry Pi Zero 2 W "
        "(1,455 mW). idle: an ASSUMPTION, not measured by the paper or by us: about 120 mA at "
        "5 V reported by CNX Software (Dec 2021, Raspberry Pi OS Lite Bullseye, Wi-Fi up)."
    ),
)
GENERIC = PowerProfile(
    name="generic",
    idle_watts=2.0,
    active_watts=6.0,
    origin="ASSUMPTION: order of magnitude of a small x86/ARM single-board computer; uncalibrated.",
)
PROFILES = {p.name: p for p in (RPI_ZERO_2W, GENERIC)}


class EnergyMeter(Protocol):
    source: PowerSource
    scope: Scope
    description: str

    def start(self) -> None: ...

    def read_joules(self) -> float: ...

    def close(self) -> None: ...


class CounterMeter:
    """A cumulative energy counter in µJ (RAPL energy_uj, hwmon energy*_input), wrap-aware.

    Read it more often than it wraps (RAPL: every few minutes at most; the heartbeat does)."""

    def __init__(
        self,
        read_raw: Callable[[], int],
        *,
        max_range_uj: int | None,
        source: PowerSource,
        scope: Scope,
        description: str,
    ):
        self.source, self.scope, self.description = source, scope, description
        self._read_raw = read_raw
        self._max_range = max_range_uj
        self._lock = threading.Lock()
        self._last_raw = read_raw()
        self._total_uj = 0

    def start(self) -> None:
        pass

    def read_joules(self) -> float:
        with self._lock:
            raw = self._read_raw()
            self._total_uj += counter_delta(self._last_raw, raw, self._max_range)
            self._last_raw = raw
            return self._total_uj / 1e6

    def close(self) -> None:
        pass


def counter_delta(previous: int, current: int, max_range: int | None) -> int:
    """Increase of a counter that wraps to 0 after `max_range` (RAPL's max_energy_range_uj)."""
    if current >= previous:
        return current - previous
    if max_range is None:
        return 0  # a counter without a known range went backwards: reset, count nothing
    return max_range - previous + current


class IntegratingMeter:
    """Integrates an instantaneous power reading (trapezoid rule) on a background thread."""

    def __init__(
        self,
        read_watts: Callable[[], float],
        *,
        source: PowerSource,
        scope: Scope,
        description: str,
        chip: str | None = None,  # the sensor chip a driver names, e.g. "ina226"
        interval_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.source, self.scope, self.description = source, scope, description
        self.chip = chip
        self._read_watts = read_watts
        self._interval = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last = (clock(), read_watts())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        try:
            watts = self._read_watts()
        except (OSError, ValueError) as err:  # a glitch on the bus: skip this sample
            log.debug("power sample failed: %s", err)
            return
        with self._lock:
            now = self._clock()
            then, previous_watts = self._last
            self._joules += (now - then) * (watts + previous_watts) / 2
            self._last = (now, watts)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def read_joules(self) -> float:
        self.sample()
        with self._lock:
            return self._joules

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


class ModelMeter:
    """idle × wall seconds + (active − idle) × CPU seconds of this process."""

    source = PowerSource.MODEL
    scope = Scope.BOARD

    def __init__(
        self,
        profile: PowerProfile,
        *,
        wall_clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ):
        self.profile = profile
        self.description = f"model {profile.name} ({profile.idle_watts} W idle, "
        self.description += f"{profile.active_watts} W active)"
        self._wall, self._cpu = wall_clock, cpu_clock
        self._wall0, self._cpu0 = wall_clock(), cpu_clock()

    def start(self) -> None:
        pass

    def read_joules(self) -> float:
        wall = self._wall() - self._wall0
        cpu = self._cpu() - self._cpu0
        p = self.profile
        return p.idle_watts * wall + (p.active_watts - p.idle_watts) * cpu

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class EnergyMeasurement:
    joules: float
    seconds: float
    source: PowerSource
    scope: Scope
    description: str

    @property
    def mean_watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0


class EnergyWindow:
    """`with EnergyWindow(meter) as w: work()` then `w.result`: the energy of `work()`."""

    def __init__(self, meter: EnergyMeter, clock: Callable[[], float] = time.monotonic):
        self._meter, self._clock = meter, clock
        self.result: EnergyMeasurement | None = None

    def __enter__(self) -> EnergyWindow:
        self._t0, self._j0 = self._clock(), self._meter.read_joules()
        return self

    def __exit__(self, *exc: object) -> None:
        m = self._meter
        self.result = EnergyMeasurement(
            joules=max(0.0, m.read_joules() - self._j0),
            seconds=self._clock() - self._t0,
            source=m.source,
            scope=m.scope,
            description=m.description,
        )


def source_label(meter: EnergyMeter) -> str:
    """The name reports and heartbeats carry: ina219 (raw I2C), rapl, hwmon, hwmon:<chip> (an
    INA2xx behind the Linux hwmon driver, e.g. hwmon:ina226) or model:<profile>."""
    if isinstance(meter, ModelMeter):
        return f"model:{meter.profile.name}"
    chip = getattr(meter, "chip", None)
    if meter.source is PowerSource.INA2XX_HWMON and chip:
        return f"hwmon:{chip}"
    return {
        PowerSource.INA219_I2C: "ina219",
        PowerSource.INA2XX_HWMON: "hwmon",
        PowerSource.RAPL: "rapl",
        PowerSource.HWMON: "hwmon",
    }[meter.source]
