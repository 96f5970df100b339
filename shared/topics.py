"""MQTT topic names: the only place they are spelled out (docs/architecture.md, "Topics").

Every topic is `{root}/{device_id}/{kind}`; the device id is one whole level so broker ACLs can
match it with `%u` and a `+` wildcard can stand for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_ROOT = "fleet"
DEVICE_ID_PATTERN = re.compile(r"[a-z0-9-]{1,64}")
# A root may have several levels ("site-a/fleet") but no wildcards, empty levels or `$` prefix
# (topics starting with `$` are the broker's own, e.g. $SYS).
_ROOT_LEVEL = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHARE_PREFIX = "$share/"  # MQTT 5 shared subscriptions: $share/{group}/{filter}


class TopicKind(StrEnum):
    """The last level(s) of a device topic; the value is the topic suffix."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    JOB = "job"
    REPORT = "report"
    FETCH = "fetch"
    CMD_JOB = "cmd/job"
    CMD_ADAPTER = "cmd/adapter"
    CMD_DESIRED = "cmd/desired"

    @property
    def from_device(self) -> bool:
        return self in UPLINK

    @property
    def retained(self) -> bool:
        # Only current state is retained, never commands or telemetry.
        return self in (TopicKind.STATUS, TopicKind.CMD_DESIRED)

    @property
    def qos(self) -> int:
        # Telemetry is periodic and superseded by the next beat: QoS 0 is enough.
        return 0 if self is TopicKind.TELEMETRY else 1


UPLINK = frozenset(
    {TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.JOB, TopicKind.REPORT, TopicKind.FETCH}
)
DOWNLINK = frozenset({TopicKind.CMD_JOB, TopicKind.CMD_ADAPTER, TopicKind.CMD_DESIRED})
_BY_SUFFIX = {kind.value: kind for kind in TopicKind}


def _validate_share_group(group: str) -> None:
    if not _ROOT_LEVEL.fullmatch(group):
        raise ValueError(f"invalid share group {group!r}: one level of [A-Za-z0-9_.-]")


def validate_device_id(device_id: object) -> str:
    """Return `device_id` if it is a valid device id, else raise ValueError."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise ValueError(f"invalid device id {device_id!r}: must match [a-z0-9-]{{1,64}}")
    return device_id


def _validate_root(root: str) -> None:
    levels = root.split("/") if isinstance(root, str) else [None]
    if not all(isinstance(lv, str) and _ROOT_LEVEL.fullmatch(lv) for lv in levels):
        raise ValueError(
            f"invalid topic root {root!r}: levels of [A-Za-z0-9_.-], no wildcards or empty levels"
        )


@dataclass(frozen=True)
class Topics:
    """Topic names and subscription filters under one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        _validate_root(self.root)

    def topic(self, device_id: str, kind: TopicKind) -> str:
        return f"{self.root}/{validate_device_id(device_id)}/{TopicKind(kind).value}"

    def status(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.STATUS)

    def telemetry(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.TELEMETRY)

    def job(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.JOB)

    def report(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.REPORT)

    def fetch(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.FETCH)

    def cmd_job(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.CMD_JOB)

    def cmd_adapter(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.CMD_ADAPTER)

    def cmd_desired(self, device_id: str) -> str:
        return self.topic(device_id, TopicKind.CMD_DESIRED)

    def all_devices(self, kind: TopicKind) -> str:
        """Subscription filter for one kind across the fleet, e.g. `fleet/+/status`."""
        return f"{self.root}/+/{TopicKind(kind).value}"

    def coordinator_subscriptions(self, share_group: str | None = None) -> list[tuple[str, int]]:
        """(filter, QoS) pairs the coordinator subscribes to: every device → coordinator kind.

        With a share group (a partitioned coordinator, MQTT 5) the broker hands each message
        to one of the group's subscribers, except `status`: every ingest subscribes to it whole,
        because a shared subscription gets no retained messages, and the retained presences
        are how each ingest learns (again, after a restart) which cohort every device is in."""
        if share_group is None:
            return [(self.all_devices(kind), kind.qos) for kind in TopicKind if kind in UPLINK]
        _validate_share_group(share_group)
        return [
            (self.all_devices(kind), kind.qos)
            if kind is TopicKind.STATUS
            else (f"{SHARE_PREFIX}{share_group}/{self.all_devices(kind)}", kind.qos)
            for kind in TopicKind
            if kind in UPLINK
        ]

    def device_subscriptions(self, device_id: str) -> list[tuple[str, int]]:
        """(topic, QoS) pairs a device subscribes to: its own commands only."""
        return [(self.topic(device_id, kind), kind.qos) for kind in TopicKind if kind in DOWNLINK]

    def parse(self, topic: str) -> tuple[str, TopicKind]:
        """Split a topic into (device_id, kind); ValueError for anything not ours."""
        prefix = self.root + "/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise ValueError(f"topic {topic!r} is not under root {self.root!r}")
        device_id, _, suffix = topic[len(prefix) :].partition("/")
        kind = _BY_SUFFIX.get(suffix)
        if kind is None:
            raise ValueError(f"topic {topic!r} has no known kind (suffix {suffix!r})")
        return validate_device_id(device_id), kind
