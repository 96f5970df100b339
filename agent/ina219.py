"""Read an INA219 current/power monitor directly over I2C (Linux i2c-dev, SMBus ioctl).

Only the shunt- and bus-voltage registers are read; they need no calibration register, so the
agent never writes to the chip: power = V_bus × V_shunt / R_shunt. The power-on configuration
(32 V range, ±320 mV shunt range, 12-bit, continuous) is what these registers assume.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path
from typing import Protocol

# <linux/i2c-dev.h>, <linux/i2c.h>
I2C_SLAVE = 0x0703
I2C_SMBUS = 0x0720
I2C_SMBUS_READ = 1
I2C_SMBUS_WORD_DATA = 3

REG_SHUNT_VOLTAGE = 0x01  # signed, LSB 10 µV
REG_BUS_VOLTAGE = 0x02  # bits 15..3, LSB 4 mV; bit 0 = math overflow
SHUNT_LSB_VOLTS = 10e-6
BUS_LSB_VOLTS = 4e-3


class WordReader(Protocol):
    def read_word(self, register: int) -> int:
        """One 16-bit register, as the chip sends it (most significant byte first)."""
        ...


class Ina219Overflow(ValueError):
    """The chip flagged a math overflow: the reading is meaningless (wrong shunt range)."""


def power_watts(reader: WordReader, shunt_ohms: float) -> float:
    shunt_raw = reader.read_word(REG_SHUNT_VOLTAGE)
    bus_raw = reader.read_word(REG_BUS_VOLTAGE)
    if bus_raw & 0x1:
        raise Ina219Overflow("INA219 overflow flag set")
    shunt_volts = _signed16(shunt_raw) * SHUNT_LSB_VOLTS
    bus_volts = (bus_raw >> 3) * BUS_LSB_VOLTS
    return abs(bus_volts * shunt_volts / shunt_ohms)


def _signed16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


class _SmbusData(ctypes.Union):
    _fields_ = [
        ("byte", ctypes.c_uint8),
        ("word", ctypes.c_uint16),
        ("block", ctypes.c_uint8 * 34),
    ]


class _SmbusIoctlData(ctypes.Structure):
    _fields_ = [
        ("read_write", ctypes.c_uint8),
        ("command", ctypes.c_uint8),
        ("size", ctypes.c_uint32),
        ("data", ctypes.POINTER(_SmbusData)),
    ]


class SmbusWordReader:
    """SMBus 'read word data' through /dev/i2c-N, the same call as i2cget -y N ADDR REG w."""

    def __init__(self, device: Path, address: int):
        self._fd = os.open(device, os.O_RDWR)
        try:
            fcntl.ioctl(self._fd, I2C_SLAVE, address)
        except OSError:
            os.close(self._fd)
            raise

    def read_word(self, register: int) -> int:
        data = _SmbusData()
        request = _SmbusIoctlData(
            read_write=I2C_SMBUS_READ,
            command=register,
            size=I2C_SMBUS_WORD_DATA,
            data=ctypes.pointer(data),
        )
        fcntl.ioctl(self._fd, I2C_SMBUS, request)
        word = int(data.word)  # SMBus delivers the first byte in the low half...
        return ((word & 0xFF) << 8) | (word >> 8)  # ...but the INA219 sends its MSB first

    def close(self) -> None:
        os.close(self._fd)
