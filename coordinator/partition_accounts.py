"""One broker account per partition: the naming rule, and each partition's MQTT settings.

A broker with `use_username_as_clientid` (deploy/'s) makes the account the client id, so
partitions sharing the coordinator's account would close each other's connection. With an
account (`--username U --password-file F`) and `--partitions N > 1`, partition I connects as
`U-pI` with the password in `F-pI` (deploy/mosquitto/make-accounts.sh --partitions N makes
those accounts, files and ACL blocks). One partition connects with the coordinator's own
account, as always. Plain logic: no config import (coordinator.config uses this module).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # shared.mqtt imports paho; `skipfleet --help` imports this via config
    from shared.mqtt import MqttSettings


def partition_username(username: str, index: int) -> str:
    return f"{username}-p{index}"


def partition_password_file(password_file: str | Path, index: int) -> Path:
    return Path(f"{password_file}-p{index}")


def partition_mqtt(mqtt: MqttSettings, passwords: tuple[str, ...], index: int) -> MqttSettings:
    """Partition `index`'s connection: its own account if the coordinator has one (its
    password from `passwords`, read at start-up), else the coordinator's settings."""
    if mqtt.username is None:
        return mqtt
    password = passwords[index] if passwords else None
    return dataclasses.replace(
        mqtt, username=partition_username(mqtt.username, index), password=password
    )
