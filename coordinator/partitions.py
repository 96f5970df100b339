"""A partitioned coordinator's plain logic: which partition owns a cohort, each partition's
config and state dir, and the ingest's routing of device messages to their owner.

The fleet state is split by cohort: rounds, aggregation, clusters and rollouts are per cohort,
so each stays inside one partition and no decision needs two. A cohort's partition is a stable
hash of its id (the same on every node and after every restart). Every partition's ingest gets
a share of the device messages (MQTT 5 shared subscriptions) and hands each to the partition of
its device's cohort; which cohort a device is in comes from its presence (retained on
`status`, which every ingest subscribes to whole) or, for a device whose presence it has not
seen, from the partitions' registries (DeviceDirectory). No Ray in here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.fleet import task_name
from coordinator.ingest import Received
from coordinator.instance import InstanceConflict
from coordinator.partition_accounts import partition_mqtt
from coordinator.registry import cohort_id
from coordinator.state_db import DB_FILENAME
from shared.protocol import Presence

PARTITIONS_DIR = "partitions"
LAYOUT_FILE = "layout.json"


class LayoutMismatch(InstanceConflict):
    """The state dir was written with another number of partitions: its cohorts would move."""


def partition_of(cohort: str, partitions: int) -> int:
    """The partition that owns a cohort: stable across processes, nodes and restarts (Python's
    hash() is salted per process, so a digest instead)."""
    digest = hashlib.sha256(cohort.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def presence_cohort(presence: Presence) -> str:
    """The registry's cohort id of a device that sent this presence (as registry.register)."""
    return cohort_id(presence.base_model_hash, task_name(presence.cohort))


def partition_config(config: CoordinatorConfig, index: int) -> CoordinatorConfig:
    """The config partition `index` runs with: its own state dir under the coordinator's, and
    its own MQTT client id and actor name (the instance name made explicit: it is derived from
    the state dir otherwise, which differs per partition), and its own broker account if the
    coordinator has one (coordinator.partition_accounts)."""
    return dataclasses.replace(
        config,
        mqtt=partition_mqtt(config.mqtt, config.partition_passwords, index),
        state_dir=config.state_dir / PARTITIONS_DIR / f"p{index}",
        instance=config.instance_name,
        partition_index=index,
        api_token_file=config.token_path,
    )


def check_layout(config: CoordinatorConfig) -> None:
    """Refuses a state dir written with another partition count (a cohort's state would sit
    in a partition that no longer owns it); records the count on a fresh one."""
    layout = Path(config.state_dir) / PARTITIONS_DIR / LAYOUT_FILE
    recorded = json.loads(layout.read_text())["partitions"] if layout.exists() else None
    if recorded is None and (Path(config.state_dir) / DB_FILENAME).exists():
        recorded = 1  # a single-partition coordinator's state
    if recorded is not None and recorded != config.partitions:
        raise LayoutMismatch(
            f"the state dir {config.state_dir} holds a fleet split into {recorded} "
            f"partition(s); this coordinator was started with --partitions "
            f"{config.partitions}. Start it with --partitions {recorded}, or give it a new "
            f"--state-dir (cohorts do not move between partitions)"
        )
    if config.partitioned and recorded is None:
        layout.parent.mkdir(parents=True, exist_ok=True)
        layout.write_text(json.dumps({"partitions": config.partitions}) + "\n")


@dataclass
class Routed:
    """One ingest batch split by owner; `unplaced`: devices whose cohort is not known yet."""

    local: list[Received] = field(default_factory=list)
    remote: dict[int, list[Received]] = field(default_factory=dict)
    unplaced: list[Received] = field(default_factory=list)
    unplaced_devices: set[str] = field(default_factory=set)
    # presences of devices another partition owns: its own ingest gets them too (`status` is
    # subscribed whole), so they are only learned from here, never forwarded
    learned_only: int = 0


class DeviceDirectory:
    """device -> partition, as far as this ingest knows; used by one thread (the bridge's
    worker). Learned from presences and from the partitions' registries; rebuilt after a
    restart from the retained presences the broker delivers on subscribe."""

    def __init__(self, me: int, partitions: int) -> None:
        self.me = me
        self.partitions = partitions
        self._owner: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, device_id: str) -> int | None:
        return self._owner.get(device_id)

    def learn(self, device_id: str, partition: int) -> None:
        self._owner[device_id] = partition

    def learn_presence(self, received: Received) -> int:
        message = received.envelope.message
        assert isinstance(message, Presence)
        owner = partition_of(presence_cohort(message), self.partitions)
        self._owner[received.device_id] = owner
        return owner

    def route(self, batch: Sequence[Received]) -> Routed:
        """Each message to its device's partition, in order per device: once a device is
        unplaced in this batch, its later messages wait with it."""
        routed = Routed()
        for received in batch:
            device = received.device_id
            if isinstance(received.envelope.message, Presence):
                owner: int | None = self.learn_presence(received)
                if owner != self.me:
                    routed.learned_only += 1
                    continue
            elif device in routed.unplaced_devices:
                owner = None
            else:
                owner = self.owner(device)
            self._place(routed, received, owner)
        return routed

    def place_unplaced(self, routed: Routed, found: dict[str, int]) -> list[Received]:
        """After a registry look-up: routes what it placed; returns what is still unplaced."""
        self._owner.update(found)
        still = []
        for received in routed.unplaced:
            owner = self.owner(received.device_id)
            if owner is None:
                still.append(received)
            else:
                self._place(routed, received, owner)
        routed.unplaced, routed.unplaced_devices = [], set()
        return still

    def _place(self, routed: Routed, received: Received, owner: int | None) -> None:
        if owner is None:
            routed.unplaced.append(received)
            routed.unplaced_devices.add(received.device_id)
        elif owner == self.me:
            routed.local.append(received)
        else:
            routed.remote.setdefault(owner, []).append(received)


def devices_of(batch: Iterable[Received]) -> list[str]:
    return list(dict.fromkeys(r.device_id for r in batch))
