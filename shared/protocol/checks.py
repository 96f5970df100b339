"""Value checks shared by the message dataclasses. They raise ValueError; the codec turns that
into DecodeError for bytes from the wire, so a message that constructs is a valid message."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

# Ids chosen by our own software: job ids, round ids, boot ids, cohorts, hashes, versions.
TOKEN = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex
# The sensor kind, optionally qualified: "hwmon:ina226" (a chip behind the hwmon driver),
# "model:rpi-zero-2w" (the energy model's profile).
POWER_SOURCE = re.compile(r"(ina219|rapl|hwmon|model)(:[a-z0-9._-]{1,64})?")
METHOD = re.compile(r"[a-z0-9-]{1,32}")
ARRAY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
MAX_TEXT = 1024
MAX_SCALARS = 64
MAX_ARRAYS = 64
MAX_INT = 2**63 - 1
# No honest adapter comes near: ΔW entries are O(0.01-1) (logits move by x·ΔW over hundreds of
# inputs). A report or a fleet adapter beyond it is refused, by the coordinator and by the
# agent, instead of being averaged (a finite 1e30 overflowed a float32 aggregate to Inf).
ADAPTER_VALUE_BOUND = 1e3

Scalar = str | int | float | bool | None


def token(value: object, what: str, pattern: re.Pattern[str] = TOKEN) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} must match {pattern.pattern}, got {value!r}")


def boolean(value: object, what: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")


def text(value: object, what: str, max_len: int = MAX_TEXT) -> None:
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"{what} must be a string of at most {max_len} characters")


def integer(value: object, what: str, lo: int = 0, hi: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")


def number(value: object, what: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    """A finite real in [lo, hi]; ints are accepted where floats are expected."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ValueError(f"{what} must be a finite number in [{lo}, {hi}], got {value!r}")


def fraction(value: object, what: str) -> None:
    number(value, what, 0.0, 1.0)


def scalar_map(value: object, what: str) -> None:
    """A small flat mapping of str -> str/int/float/bool/None (device info, job detail)."""
    if not isinstance(value, Mapping) or len(value) > MAX_SCALARS:
        raise ValueError(f"{what} must be a mapping of at most {MAX_SCALARS} entries")
    for key, item in value.items():
        text(key, f"{what} key", 64)
        if isinstance(item, str):
            text(item, f"{what}[{key!r}]")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{what}[{key!r}] must be finite")
        elif item is not None and not isinstance(item, int | float | bool):
            raise ValueError(f"{what}[{key!r}] must be a scalar, got {type(item).__name__}")


def float_arrays(value: object, what: str) -> None:
    """Named real-valued tensors (adapter weights); finiteness is the consumer's check."""
    if not isinstance(value, Mapping) or len(value) > MAX_ARRAYS:
        raise ValueError(f"{what} must be a mapping of at most {MAX_ARRAYS} arrays")
    for name, array in value.items():
        token(name, f"{what} name", ARRAY_NAME)
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            raise ValueError(f"{what}[{name!r}] must be a floating-point numpy array")


def vector(value: object, what: str, max_len: int) -> None:
    """A 1-D finite float array of 1..max_len entries (a device's feature signature)."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim != 1:
        raise ValueError(f"{what} must be a 1-D floating-point numpy array")
    if not 1 <= value.shape[0] <= max_len or not np.isfinite(value).all():
        raise ValueError(f"{what} must hold 1..{max_len} finite values")
