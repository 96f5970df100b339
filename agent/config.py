"""The agent's configuration: read once at the entry point into a frozen dataclass.

This is the only module of the agent that reads environment variables. Everything else gets an
`AgentConfig` (or the part of it it needs) passed in.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError
from shared.config_file import (
    SecretFileError,
    prepare_parser,
    read_secret_file,
    resolve_args,
    source_rank,
)

if TYPE_CHECKING:  # `skipfleet --help` imports this module: keep paho out of the import
    from shared.mqtt import MqttSettings

MQTT_VERSIONS = ("5", "3.1.1")  # shared.mqtt.MqttProtocol's values

DEVICE_ID_PATTERN = re.compile(r"^[a-z0-9-]{1,64}$")
COHORT_PATTERN = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")
TOPIC_ROOT_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")

ENV_DEVICE_ID = "SKIPFLEET_DEVICE_ID"
ENV_BROKER = "SKIPFLEET_BROKER"
ENV_USERNAME = "SKIPFLEET_MQTT_USERNAME"
ENV_PASSWORD = "SKIPFLEET_MQTT_PASSWORD"
ENV_PASSWORD_FILE = "SKIPFLEET_MQTT_PASSWORD_FILE"
# The device's own data. (SKIPFLEET_DATA_DIR names the folder of the public data sets that
# the rest of the product reads; the agent never looks at it.)
ENV_DATA = "SKIPFLEET_DEVICE_DATA"
ENV_BASE_MODEL = "SKIPFLEET_BASE_MODEL"
ENV_STATE_DIR = "SKIPFLEET_STATE_DIR"
ENV_HEALTH_FILE = "SKIPFLEET_HEALTH_FILE"
DEFAULT_BROKER = "mqtt://localhost:1883"
# option -> the environment variable that overrides the config file for it
ENV_VARS = {
    "device_id": ENV_DEVICE_ID,
    "broker": ENV_BROKER,
    "username": ENV_USERNAME,
    "password": ENV_PASSWORD,
    "password_file": ENV_PASSWORD_FILE,
    "data": ENV_DATA,
    "base_model": ENV_BASE_MODEL,
    "state_dir": ENV_STATE_DIR,
    "health_file": ENV_HEALTH_FILE,
}


class PowerProfileChoice(Enum):
    """Which calibrated model to use when no power sensor is found; `auto` reads the board model."""

    AUTO = "auto"
    RPI_ZERO_2W = "rpi-zero-2w"
    GENERIC = "generic"


@dataclass(frozen=True)
class Ina219Config:
    """A raw INA219 on an I2C bus. Opt-in: probing unknown I2C addresses can upset other chips."""

    bus: int
    address: int
    shunt_ohms: float

    @classmethod
    def parse(cls, text: str) -> Ina219Config:
        """`BUS:ADDRESS[:SHUNT_OHMS]`, e.g. `1:0x40:0.1` (common breakout boards: 0.1 Ω shunt)."""
        fields = text.split(":")
        if len(fields) not in (2, 3):
            raise ConfigError(f"--ina219 {text!r}: expected BUS:ADDRESS[:SHUNT_OHMS]")
        try:
            bus, address = int(fields[0]), int(fields[1], 0)
            shunt = float(fields[2]) if len(fields) == 3 else 0.1
        except ValueError:
            raise ConfigError(f"--ina219 {text!r}: not numbers") from None
        if not (0x03 <= address <= 0x77) or not shunt > 0 or bus < 0:
            raise ConfigError(f"--ina219 {text!r}: address must be 0x03..0x77, shunt > 0")
        return cls(bus=bus, address=address, shunt_ohms=shunt)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    mqtt: MqttSettings  # broker address, credentials, protocol, session (shared.mqtt)
    data_path: Path
    base_model_path: Path
    state_dir: Path
    topic_root: str = "fleet"
    cohort: str = "default"  # devices that share fleet adapters (same task, same base model)
    will_delay_seconds: int = 5
    fetch_timeout_seconds: float = 60.0
    heartbeat_seconds: float = 30.0
    holdout_fraction: float = 0.25
    seed: int = 0
    power_profile: PowerProfileChoice = PowerProfileChoice.AUTO
    ina219: Ina219Config | None = None
    spool_max_messages: int = 10_000
    max_queued_jobs: int = 4
    # A job still unfinished this long after it arrived says IN_PROGRESS; a quicker one sends
    # its end alone (agent/job_progress.py)
    in_progress_after_seconds: float = 5.0
    stream_rows: int = 8  # rows of its data the simulated sensor "observes" per heartbeat
    drift_at_seconds: float | None = None  # switch to the drifted data this long after start
    desired_retry_seconds: float = 30.0  # first wait for a desired adapter, doubled per fetch
    desired_max_fetches: int = 5
    health_file: Path | None = None  # rewritten while connected: a container healthcheck
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check(
            DEVICE_ID_PATTERN.match(self.device_id),
            f"device id {self.device_id!r}: [a-z0-9-]{{1,64}}",
        )
        _check(TOPIC_ROOT_PATTERN.match(self.topic_root), f"topic root {self.topic_root!r}")
        _check(0 < self.holdout_fraction < 1, "--holdout-fraction must be in (0, 1)")
        _check(
            math.isfinite(self.heartbeat_seconds) and self.heartbeat_seconds > 0,
            "--heartbeat-seconds must be > 0",
        )
        _check(self.spool_max_messages >= 10, "--spool-max-messages must be >= 10")
        _check(self.will_delay_seconds >= 0, "--will-delay-seconds must be >= 0")
        _check(COHORT_PATTERN.match(self.cohort), f"cohort {self.cohort!r}: [A-Za-z0-9_.:+-]")
        _check(self.fetch_timeout_seconds > 0, "--fetch-timeout-seconds must be > 0")
        _check(self.max_queued_jobs >= 1, "--max-queued-jobs must be >= 1")
        _check(
            math.isfinite(self.in_progress_after_seconds) and self.in_progress_after_seconds >= 0,
            "--in-progress-after-seconds must be >= 0",
        )
        _check(self.stream_rows >= 0, "--stream-rows must be >= 0")
        _check(
            self.drift_at_seconds is None
            or (math.isfinite(self.drift_at_seconds) and self.drift_at_seconds >= 0),
            "--drift-at must be >= 0 seconds",
        )
        _check(
            math.isfinite(self.desired_retry_seconds) and self.desired_retry_seconds > 0,
            "--desired-retry-seconds must be > 0",
        )
        _check(self.desired_max_fetches >= 1, "--desired-max-fetches must be >= 1")
        _check(
            self.mqtt.tls_ca is None or Path(self.mqtt.tls_ca).is_file(),
            f"--tls-ca {self.mqtt.tls_ca}: no such file",
        )


def _check(condition: object, message: str) -> None:
    if not condition:
        raise ConfigError(f"invalid configuration: {message}")


def device_id_from_hostname(hostname: str) -> str:
    """Compose replicas are named like `skipfleet_agent_3`: lower-case, other characters -> '-'."""
    return re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:64]


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> AgentConfig:
    """Build the config from parsed arguments, the environment and the config file (flag >
    environment > file > default: shared.config_file). Raises ConfigFileError for a file or
    variable that cannot be read, ConfigError for values the agent cannot use."""
    args = resolve_args(args, environ)
    return AgentConfig(
        device_id=args.device_id or device_id_from_hostname(socket.gethostname()),
        mqtt=_mqtt_settings(args),
        data_path=_required_path(args.data, "--data", ENV_DATA),
        base_model_path=_required_path(args.base_model, "--base-model", ENV_BASE_MODEL),
        state_dir=_required_path(args.state_dir, "--state-dir", ENV_STATE_DIR),
        topic_root=args.topic_root,
        cohort=args.cohort,
        will_delay_seconds=args.will_delay_seconds,
        fetch_timeout_seconds=args.fetch_timeout_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        power_profile=PowerProfileChoice(args.power_profile),
        ina219=Ina219Config.parse(args.ina219) if args.ina219 else None,
        spool_max_messages=args.spool_max_messages,
        max_queued_jobs=args.max_queued_jobs,
        in_progress_after_seconds=args.in_progress_after_seconds,
        stream_rows=args.stream_rows,
        drift_at_seconds=args.drift_at,
        desired_retry_seconds=args.desired_retry_seconds,
        desired_max_fetches=args.desired_max_fetches,
        health_file=_optional_path(args.health_file),
        log_level=args.log_level.upper(),
    )


def _mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    from shared.mqtt import MqttProtocol, parse_broker_url

    url = args.broker or DEFAULT_BROKER
    overrides: dict = {
        "protocol": MqttProtocol(args.mqtt_version),
        "keepalive_s": args.keepalive_seconds,
        "reconnect_max_delay_s": args.reconnect_max_seconds,
        "session_expiry_s": args.session_expiry_seconds,
        "tls_ca": args.tls_ca,
    }
    # Unset values keep what the URL says (mqtt://user:pass@host).
    username, password = args.username, _password(args)
    if username:
        overrides["username"] = username
    if password is not None:
        overrides["password"] = password
    try:
        return parse_broker_url(url, **overrides)
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from None


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _required_path(value: str | None, flag: str, env: str) -> Path:
    if not value:
        raise ConfigError(f"{flag} is required (or set {env}, or {flag[2:].replace('-', '_')} "
                          "in the config file's [agent] table)")  # fmt: skip
    return Path(value)


def _password(args: argparse.Namespace) -> str | None:
    """Command line before environment before config file; within each, a file before a
    literal password (which the config file never holds)."""
    # A password on the command line is visible in `ps`; a file (compose secrets) or the
    # environment are the better places, the flag is kept for quick local runs.
    sources = args._config_sources
    file_rank, literal_rank = (source_rank(sources[k]) for k in ("password_file", "password"))
    if args.password_file and (file_rank <= literal_rank or not args.password):
        return _read_password(args.password_file, _described(sources["password_file"]))
    literal: str | None = args.password
    return literal


def _described(source: str) -> str:
    """A password file's source as its messages name it: the flag, the variable, the file."""
    kind, _, where = source.partition(":")
    return {"flag": "--password-file", "env": where}.get(kind, f"password_file in {where}")


def _read_password(path: str, source: str) -> str:
    try:
        return read_secret_file(path, source)
    except SecretFileError as err:
        raise ConfigError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of `skipfleet agent` (defaults mirror AgentConfig)."""
    add = parser.add_argument
    add("--device-id", help="[a-z0-9-]{1,64} (default: the host name, lower case)")
    add("--broker", default=DEFAULT_BROKER, help="mqtt://host:port or mqtts://host:port (TLS)")
    add("--username", help="MQTT user name (default: the URL's, else none)")
    add("--password", help="MQTT password (visible in ps: prefer --password-file)")
    add(
        "--password-file",
        help="read the MQTT password from this file (compose secrets, systemd credentials)",
    )
    add("--tls-ca", help="CA certificate file for a TLS broker (mqtts://; default: the system's)")
    add(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        default="5",
        help="MQTT 5, or 3.1.1 for older brokers",
    )
    add("--topic-root", default="fleet", help="first level of every topic (the coordinator's)")
    add("--cohort", default="default", help="group of devices sharing fleet adapters")
    add("--data", help="device data (.npz with X, y) or a directory (required, no default)")
    add("--base-model", help="the pre-trained base model (.npz) (required, no default)")
    add("--state-dir", help="where adapters, spool and job history live (required, no default)")
    add(
        "--health-file",
        help="a file rewritten on connect and every heartbeat while connected, for a "
        "container healthcheck to check its age (default: none)",
    )
    add(
        "--heartbeat-seconds",
        type=float,
        default=30.0,
        help="seconds between heartbeats (status, drift scores, power)",
    )
    add(
        "--holdout-fraction",
        type=float,
        default=0.25,
        help="share of the local data kept back to measure accuracy (stratified)",
    )
    add("--seed", type=int, default=0, help="seed of the hold-out split")
    add(
        "--power-profile",
        choices=[p.value for p in PowerProfileChoice],
        default="auto",
        help="energy model used when no power sensor is found",
    )
    add(
        "--ina219",
        help="read a raw INA219 on I2C: BUS:ADDRESS[:SHUNT_OHMS], e.g. 1:0x40:0.1 (default: "
        "none, as probing unknown I2C addresses can upset other chips)",
    )
    add(
        "--spool-max-messages",
        type=int,
        default=10_000,
        help="messages the on-disk spool keeps while offline; the oldest telemetry goes first",
    )
    add("--max-queued-jobs", type=int, default=4, help="jobs waiting behind the running one")
    add(
        "--in-progress-after-seconds",
        type=float,
        default=5.0,
        help="a job still unfinished this long after it arrived says IN_PROGRESS (0: always)",
    )
    add("--keepalive-seconds", type=int, default=30, help="MQTT keepalive")
    add(
        "--reconnect-max-seconds",
        type=int,
        default=60,
        help="cap of the jittered reconnect backoff (starts at 1-2 s, doubles per attempt)",
    )
    add(
        "--session-expiry-seconds",
        type=int,
        default=86_400,
        help="MQTT v5 session expiry: commands sent while offline wait this long",
    )
    add(
        "--will-delay-seconds",
        type=int,
        default=5,
        help="MQTT v5 will delay: a reconnect within this time sends no 'offline'",
    )
    add(
        "--fetch-timeout-seconds",
        type=float,
        default=60.0,
        help="how long an apply/evaluate job waits for a fetched adapter",
    )
    add(
        "--desired-retry-seconds",
        type=float,
        default=30.0,
        help="desired-state reconcile: first wait for the adapter asked for, doubled (jittered) "
        "per new request",
    )
    add(
        "--desired-max-fetches",
        type=int,
        default=5,
        help="desired-state reconcile: fetch requests per desired pointer before giving up",
    )
    add(
        "--stream-rows",
        type=int,
        default=8,
        help="simulated sensor: rows of the device data observed per heartbeat (0: off)",
    )
    add(
        "--drift-at",
        type=float,
        metavar="SECONDS",
        help="switch to the drifted data (X_drift, y_drift) this long after start (also "
        "SIGUSR1; default: never)",
    )
    add(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="least severe log messages shown",
    )
    prepare_parser(parser, "agent", ENV_VARS, not_in_file=("password",))
