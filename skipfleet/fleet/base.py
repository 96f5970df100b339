"""What every fleet backend offers: device states, fault verbs, device rows and errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Protocol


class DeviceState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # SIGSTOP / docker pause: alive, but neither computes nor answers pings
    CUT = "cut"  # running, but its network path to the broker is cut
    DEAD = "dead"  # the process or container is not running


class Verb(StrEnum):
    """Per-device actions (the control endpoint's `/devices/{id}/{verb}`)."""

    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    CUT = "cut"
    RESTORE = "restore"
    RESTART = "restart"


class CutMode(StrEnum):
    # The peer's connection is reset: the broker sees the socket close at once (Will now).
    REFUSE = "refuse"
    # Packets go nowhere and nobody is told: only MQTT keepalive finds out (a dead Wi-Fi link).
    BLACKHOLE = "blackhole"


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    state: DeviceState
    pid: int | None = None
    uptime_s: float | None = None  # since the current process or container started
    rss_bytes: int | None = None
    detail: str = ""  # backend specific: cut mode, exit code, container name...

    def to_json(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, data: dict) -> DeviceInfo:
        return cls(**{**data, "state": DeviceState(data["state"])})


class FleetError(Exception):
    """Something the caller asked for cannot be done; the message says why."""

    code = "fleet_error"


class UnknownDevice(FleetError):
    code = "unknown_device"


class InvalidRequest(FleetError):
    """A malformed request: a bad verb, device count or cut mode."""

    code = "invalid_request"


class DeviceStateError(FleetError):
    """The verb does not apply in the device's state (pausing a dead agent, say)."""

    code = "state_conflict"


class Unsupported(FleetError):
    """This backend cannot do it (e.g. scaling without a device factory)."""

    code = "unsupported"


class FleetUnavailable(FleetError):
    """No fleet answers: no control endpoint, no run state, no Docker engine."""

    code = "unavailable"


ERRORS: dict[str, type[FleetError]] = {
    e.code: e
    for e in (FleetError, UnknownDevice, InvalidRequest, DeviceStateError, Unsupported,
              FleetUnavailable)
}  # fmt: skip


class Fleet(Protocol):
    """The fault-injection interface of ProcessFleet, DockerFleet and RemoteFleet."""

    def devices(self) -> list[DeviceInfo]: ...
    def device(self, device_id: str) -> DeviceInfo: ...
    def kill(self, device_id: str) -> DeviceInfo: ...
    def pause(self, device_id: str) -> DeviceInfo: ...
    def resume(self, device_id: str) -> DeviceInfo: ...
    def cut(self, device_id: str, mode: CutMode = CutMode.BLACKHOLE) -> DeviceInfo: ...
    def restore(self, device_id: str) -> DeviceInfo: ...
    def restart(self, device_id: str) -> DeviceInfo: ...
    def cut_broker(self, mode: CutMode = CutMode.BLACKHOLE) -> list[DeviceInfo]: ...
    def restore_broker(self) -> list[DeviceInfo]: ...
    def scale(self, n: int) -> list[DeviceInfo]: ...


def apply_verb(fleet: Fleet, verb: Verb, device_id: str, mode: CutMode | None = None) -> DeviceInfo:
    """One dispatch for the control endpoint and the CLI."""
    if verb is Verb.CUT:
        return fleet.cut(device_id, mode or CutMode.BLACKHOLE)
    return getattr(fleet, verb.value)(device_id)


def parse_enum(enum: type[StrEnum], value: object, what: str):
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise InvalidRequest(f"unknown {what} {value!r}: one of {choices}") from None


def check_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidRequest(f"bad device count {n!r}: a whole number >= 0")
    return n
