"""Energy sources: detection order on a fake sysfs tree, counter wrap, integration, the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Ina219Config, PowerProfileChoice
from agent.ina219 import Ina219Overflow, power_watts
from agent.meters import (
    GENERIC,
    RPI_ZERO_2W,
    CounterMeter,
    EnergyWindow,
    IntegratingMeter,
    ModelMeter,
    PowerSource,
    Scope,
    counter_delta,
    source_label,
)
from agent.power import choose_profile, detect
from shared.protocol.checks import POWER_SOURCE


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def add_rapl(root, energy=1_000_000, max_range=262_143_328_850):
    write(root, "sys/class/powercap/intel-rapl:0/energy_uj", f"{energy}\n")
    write(root, "sys/class/powercap/intel-rapl:0/max_energy_range_uj", f"{max_range}\n")


def add_hwmon(root, index, name, **files):
    write(root, f"sys/class/hwmon/hwmon{index}/name", name + "\n")
    for file, value in files.items():
        write(root, f"sys/class/hwmon/hwmon{index}/{file}", f"{value}\n")


class FakeIna219:
    def __init__(self, shunt_raw, bus_raw):
        self.words = {0x01: shunt_raw, 0x02: bus_raw}

    def read_word(self, register):
        return self.words[register]


# ---- detection order ---------------------------------------------------------------
def test_empty_tree_falls_back_to_generic_model(tmp_path):
    found = detect(tmp_path)
    assert found.meter.source is PowerSource.MODEL
    assert found.meter.profile is GENERIC
    assert "no power sensor" in found.notes[-1]


def test_pi_zero_2w_board_picks_its_profile(tmp_path):
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi Zero 2 W Rev 1.0\x00")
    assert detect(tmp_path).meter.profile is RPI_ZERO_2W
    assert choose_profile(tmp_path, PowerProfileChoice.GENERIC) is GENERIC


def test_rapl_beats_generic_hwmon_and_model(tmp_path):
    add_rapl(tmp_path)
    add_hwmon(tmp_path, 0, "amdgpu", power1_input=5_000_000)
    found = detect(tmp_path)
    assert (found.meter.source, found.meter.scope) == (PowerSource.RAPL, Scope.CPU_PACKAGE)


def test_ina2xx_hwmon_beats_rapl(tmp_path):
    add_rapl(tmp_path)
    add_hwmon(tmp_path, 0, "coretemp", temp1_input=40000)
    add_hwmon(tmp_path, 3, "ina219", power1_input=1_250_000)
    found = detect(tmp_path)
    assert (found.meter.source, found.meter.scope) == (PowerSource.INA2XX_HWMON, Scope.BOARD)


def test_configured_ina219_i2c_comes_first(tmp_path):
    add_hwmon(tmp_path, 0, "ina219", power1_input=1_250_000)
    opened = []

    def open_i2c(device, address):
        opened.append((device, address))
        return FakeIna219(shunt_raw=2500, bus_raw=(5000 << 3))

    found = detect(tmp_path, ina219=Ina219Config(1, 0x40, 0.1), open_i2c=open_i2c)
    assert found.meter.source is PowerSource.INA219_I2C
    assert opened == [(tmp_path / "dev" / "i2c-1", 0x40)]


def test_missing_i2c_device_is_noted_and_skipped(tmp_path):
    add_rapl(tmp_path)
    found = detect(tmp_path, ina219=Ina219Config(1, 0x40, 0.1))  # real opener, no such device
    assert found.meter.source is PowerSource.RAPL
    assert "i2c-1" in found.notes[0]


def test_unreadable_rapl_is_noted_and_skipped(tmp_path):
    add_rapl(tmp_path)

    def read_text(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return path.read_text()

    found = detect(tmp_path, read_text=read_text)
    assert found.meter.source is PowerSource.MODEL
    assert any("permission denied" in note for note in found.notes)


def test_other_hwmon_prefers_energy_counter_over_power(tmp_path):
    add_hwmon(tmp_path, 1, "some_pmic", power1_input=900_000, energy1_input=5_000_000)
    found = detect(tmp_path)
    assert found.meter.source is PowerSource.HWMON
    assert isinstance(found.meter, CounterMeter)


# ---- the meters -----------------------------------------------------------------------
def test_counter_delta_handles_wrap_around():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150
    assert counter_delta(900, 50, None) == 0  # unknown range: a reset counts nothing


def test_rapl_meter_accumulates_across_a_wrap(tmp_path):
    add_rapl(tmp_path, energy=900_000, max_range=1_000_000)
    meter = detect(tmp_path).meter
    counter = tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj"
    counter.write_text("100000\n")  # wrapped: +200000 µJ
    assert meter.read_joules() == pytest.approx(0.2)
    counter.write_text("400000\n")
    assert meter.read_joules() == pytest.approx(0.5)


def test_integrating_meter_uses_trapezoids():
    now = [0.0]
    watts = iter([1.0, 3.0, 3.0])
    meter = IntegratingMeter(
        lambda: next(watts),
        source=PowerSource.HWMON,
        scope=Scope.SENSOR,
        description="fake",
        clock=lambda: now[0],
    )
    now[0] = 2.0
    meter.sample()  # (1 + 3) / 2 * 2 s = 4 J
    now[0] = 3.0
    assert meter.read_joules() == pytest.approx(7.0)  # + 3 W * 1 s


def test_model_meter_charges_idle_wall_time_and_active_cpu_time():
    wall, cpu = [0.0], [0.0]
    meter = ModelMeter(RPI_ZERO_2W, wall_clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    with EnergyWindow(meter, clock=lambda: wall[0]) as window:
        wall[0], cpu[0] = 10.0, 4.0
    result = window.result
    expected = 0.60 * 10 + (1.455 - 0.60) * 4
    assert result.joules == pytest.approx(expected)
    assert result.mean_watts == pytest.approx(expected / 10)
    assert result.source is PowerSource.MODEL
    # A fully busy core for the whole window reproduces the paper's 1.455 W.
    with EnergyWindow(meter, clock=lambda: wall[0]) as busy:
        wall[0], cpu[0] = 12.0, 6.0
    assert busy.result.mean_watts == pytest.approx(1.455)


# ---- INA219 register arithmetic --------------------------------------------------------
def test_ina219_power_from_shunt_and_bus_registers():
    # 25 mV over 0.1 Ω = 250 mA at 5.000 V bus = 1.25 W
    assert power_watts(FakeIna219(2500, 1250 << 3), 0.1) == pytest.approx(1.25)
    # negative shunt voltage (two's complement) gives the same magnitude
    assert power_watts(FakeIna219(0x10000 - 2500, 1250 << 3), 0.1) == pytest.approx(1.25)


def test_ina219_overflow_flag_is_an_error():
    with pytest.raises(Ina219Overflow):
        power_watts(FakeIna219(2500, (1250 << 3) | 1), 0.1)


def test_source_labels_match_the_wire_vocabulary(tmp_path):
    labels = [source_label(detect(tmp_path).meter)]
    add_hwmon(tmp_path, 0, "ina226", power1_input=1_000_000)
    labels.append(source_label(detect(tmp_path).meter))
    add_hwmon(tmp_path, 0, "ina219", power1_input=1_000_000)
    labels.append(source_label(detect(tmp_path).meter))
    assert labels == ["model:generic", "hwmon:ina226", "hwmon:ina219"]
    for label in labels:  # what Heartbeat and ReportMetrics accept
        assert POWER_SOURCE.fullmatch(label), label
