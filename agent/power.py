"""Power and energy: a real sensor where there is one, else a calibrated model.

Detection order (first usable wins; `detect()` returns notes saying why others were skipped):
1. an INA219 read over I2C (only when configured: blind probing of I2C addresses is unsafe);
   it sits in the board's supply line, so it measures the whole device;
2. the Linux ina2xx hwmon driver (`hwmon*/name` = ina219, ...; `power1_input` in µW);
3. powercap/RAPL `intel-rapl:0/energy_uj` (CPU package only; root-only since Linux 5.10);
4. any other hwmon energy counter (`energy*_input`, µJ) or power sensor (`power*_input`, µW);
5. the model: idle watts × wall seconds + (active − idle) watts × CPU seconds.
The meters themselves are in `agent.meters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import Ina219Config, PowerProfileChoice
from agent.ina219 import SmbusWordReader, WordReader, power_watts
from agent.meters import (
    GENERIC,
    PROFILES,
    RPI_ZERO_2W,
    CounterMeter,
    EnergyMeter,
    IntegratingMeter,
    ModelMeter,
    PowerProfile,
    PowerSource,
    Scope,
)

INA2XX_DRIVER_NAMES = frozenset(
    {"ina209", "ina219", "ina220", "ina226", "ina230", "ina231", "ina260"}
)
DEVICE_TREE_MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")


@dataclass
class Detection:
    meter: EnergyMeter
    notes: list[str] = field(default_factory=list)  # why each earlier source was skipped


I2cOpener = Callable[[Path, int], WordReader]


def detect(
    root: Path = Path("/"),
    *,
    ina219: Ina219Config | None = None,
    profile: PowerProfileChoice = PowerProfileChoice.AUTO,
    open_i2c: I2cOpener = SmbusWordReader,
    read_text: Callable[[Path], str] = Path.read_text,
) -> Detection:
    """Pick the best energy source under `root` (a fake sysfs tree in tests)."""
    notes: list[str] = []
    finders = (
        lambda: _ina219_i2c(root, ina219, open_i2c, notes),
        lambda: _ina2xx_hwmon(root, read_text, notes),
        lambda: _rapl(root, read_text, notes),
        lambda: _other_hwmon(root, read_text, notes),
    )
    for find in finders:
        meter = find()
        if meter is not None:
            return Detection(meter, notes)
    chosen = choose_profile(root, profile, read_text)
    notes.append(f"no power sensor found: estimating with profile {chosen.name}")
    return Detection(ModelMeter(chosen), notes)


def choose_profile(
    root: Path, choice: PowerProfileChoice, read_text: Callable[[Path], str] = Path.read_text
) -> PowerProfile:
    if choice is not PowerProfileChoice.AUTO:
        return PROFILES[choice.value]
    for name in DEVICE_TREE_MODEL_FILES:
        try:
            model = read_text(root / name)
        except OSError:
            continue
        if "Raspberry Pi Zero 2" in model:
            return RPI_ZERO_2W
    return GENERIC


def _ina219_i2c(
    root: Path, config: Ina219Config | None, open_i2c: I2cOpener, notes: list[str]
) -> EnergyMeter | None:
    if config is None:
        return None
    device = root / "dev" / f"i2c-{config.bus}"
    try:
        reader = open_i2c(device, config.address)
        power_watts(reader, config.shunt_ohms)  # one read now: fail at start, not mid-job
    except (OSError, ValueError) as err:
        notes.append(f"ina219 at {device} 0x{config.address:02x}: {err}")
        return None
    return IntegratingMeter(
        lambda: power_watts(reader, config.shunt_ohms),
        source=PowerSource.INA219_I2C,
        scope=Scope.BOARD,
        description=f"INA219 on {device} at 0x{config.address:02x}, shunt {config.shunt_ohms} Ω",
    )


def _hwmon_dirs(root: Path) -> list[Path]:
    base = root / "sys" / "class" / "hwmon"
    if not base.is_dir():
        return []
    return sorted(base.glob("hwmon*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 0)


def _read_int(path: Path, read_text: Callable[[Path], str]) -> int:
    return int(read_text(path).strip())


def _ina2xx_hwmon(
    root: Path, read_text: Callable[[Path], str], notes: list[str]
) -> EnergyMeter | None:
    for hwmon in _hwmon_dirs(root):
        try:
            name = read_text(hwmon / "name").strip()
        except OSError:
            continue
        if name not in INA2XX_DRIVER_NAMES:
            continue
        sensor = hwmon / "power1_input"
        try:
            _read_int(sensor, read_text)
        except (OSError, ValueError) as err:
            notes.append(f"{name} at {hwmon}: {err}")
            continue
        return IntegratingMeter(
            lambda sensor=sensor: _read_int(sensor, read_text) / 1e6,
            source=PowerSource.INA2XX_HWMON,
            scope=Scope.BOARD,
            description=f"{name} hwmon {sensor}",
            chip=name,  # one of INA2XX_DRIVER_NAMES: fits the wire's power-source pattern
        )
    return None


def _rapl(root: Path, read_text: Callable[[Path], str], notes: list[str]) -> EnergyMeter | None:
    domain = root / "sys" / "class" / "powercap" / "intel-rapl:0"
    counter = domain / "energy_uj"
    if not counter.exists():
        return None
    try:
        _read_int(counter, read_text)
        max_range = _read_int(domain / "max_energy_range_uj", read_text)
    except PermissionError:
        notes.append(f"rapl {counter}: permission denied (root-only since Linux 5.10)")
        return None
    except (OSError, ValueError) as err:
        notes.append(f"rapl {counter}: {err}")
        return None
    return _counter_meter(
        counter, max_range, PowerSource.RAPL, Scope.CPU_PACKAGE, read_text, f"RAPL {counter}"
    )


def _counter_meter(
    path: Path,
    max_range: int | None,
    source: PowerSource,
    scope: Scope,
    read_text: Callable[[Path], str],
    description: str,
) -> CounterMeter:
    return CounterMeter(
        lambda: _read_int(path, read_text),
        max_range_uj=max_range,
        source=source,
        scope=scope,
        description=description,
    )


def _other_hwmon(
    root: Path, read_text: Callable[[Path], str], notes: list[str]
) -> EnergyMeter | None:
    for hwmon in _hwmon_dirs(root):
        for sensor in sorted(hwmon.glob("energy*_input")) + sorted(hwmon.glob("power*_input")):
            try:
                _read_int(sensor, read_text)
            except (OSError, ValueError) as err:
                notes.append(f"hwmon {sensor}: {err}")
                continue
            if sensor.name.startswith("energy"):
                return _counter_meter(
                    sensor,
                    None,
                    PowerSource.HWMON,
                    Scope.SENSOR,
                    read_text,
                    f"hwmon energy counter {sensor}",
                )
            return IntegratingMeter(
                lambda sensor=sensor: _read_int(sensor, read_text) / 1e6,
                source=PowerSource.HWMON,
                scope=Scope.SENSOR,
                description=f"hwmon power sensor {sensor}",
            )
    return None
