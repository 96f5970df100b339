"""The coordinator's configuration: read once at the entry point (CLI arguments, then environment).

Nothing else in the coordinator reads the environment; every part gets this frozen dataclass (or
the piece of it it needs). Only argparse-level imports at module level: `skipfleet --help`
imports this module through coordinator.cli.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.aggregation.bounds import TrustBounds
from coordinator.clustering import DEFAULT_CLUSTER_DISTANCE
from coordinator.federation import FederationPolicy
from coordinator.partition_accounts import partition_password_file, partition_username
from coordinator.rollout import RolloutPolicy
from coordinator.scheduler import LabelFreeSignal, SchedulerPolicy
from shared.config_file import (
    SecretFileError,
    describe_type,
    prepare_parser,
    read_secret_file,
    resolve_args,
    source_rank,
)

if TYPE_CHECKING:  # keep paho out of `skipfleet --help`
    from shared.mqtt import MqttSettings

ENV_BROKER = "SKIPFLEET_BROKER"
ENV_USERNAME = "SKIPFLEET_MQTT_USERNAME"
ENV_PASSWORD = "SKIPFLEET_MQTT_PASSWORD"
ENV_PASSWORD_FILE = "SKIPFLEET_MQTT_PASSWORD_FILE"  # as the agent's
ENV_STATE_DIR = "SKIPFLEET_COORDINATOR_STATE_DIR"
ENV_RAY_ADDRESS = "SKIPFLEET_RAY_ADDRESS"
# A path, never the token itself: the environment of a process is readable in /proc and `ps e`.
ENV_API_TOKEN_FILE = "SKIPFLEET_API_TOKEN_FILE"
API_TOKEN_FILE = "api-token"  # in the state dir, made on first start (mode 0600)
INSTANCE_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
CLIENT_ID_PREFIX = "skipfleet-coordinator-"
DEFAULT_BROKER = "mqtt://localhost:1883"
# option -> the environment variable that overrides the config file for it. The password has
# no flag (a command line is visible in `ps`): only this variable or a password file.
ENV_VARS = {
    "broker": ENV_BROKER,
    "username": ENV_USERNAME,
    "password_file": ENV_PASSWORD_FILE,
    "state_dir": ENV_STATE_DIR,
    "ray_address": ENV_RAY_ADDRESS,
    "api_token_file": ENV_API_TOKEN_FILE,
}

LOCAL_RAY = "local"
# 9464 is the port Prometheus exporters of OpenTelemetry SDKs use by default: free of the
# well-known ones (9090 Prometheus itself, 8080 our API, 8265 Ray's dashboard).
DEFAULT_METRICS_PORT = 9464
DEFAULT_API_PORT = 8080
# The BN1 drift score (mean squared z-score: about 1.05 on the pre-training data, 2.7 on the
# noisy-room fan data) is off by default: it separates harmful drift poorly (docs/benchmarks.md,
# label-free drift); the calibrated label-free scores trigger instead (--label-free-threshold).
DEFAULT_DRIFT_THRESHOLD = None
# Devices need 2 labelled canaries before one that cannot measure gets a new adapter.
DEFAULT_MIN_CANARIES = 2
# The API and /metrics answer this machine only unless the operator binds them elsewhere.
DEFAULT_BIND = "127.0.0.1"
DAY_S = 86_400.0
DEFAULT_HISTORY_DAYS = 30.0
MAX_PARTITIONS = 64


class ConfigError(ValueError):
    """Bad configuration: the CLI prints it and exits with its own code."""


class AggregationAlgorithm(StrEnum):
    """The strategies of coordinator.aggregation, by name (here so --help needs no numpy)."""

    EXACT_DELTA = "exact-delta"
    NAIVE_FEDAVG = "naive-fedavg"
    COORDINATE_MEDIAN = "coordinate-median"  # robust: unweighted, per coordinate
    TRIMMED_MEAN = "trimmed-mean"  # robust: drops each coordinate's extremes


class AggregationRunner(StrEnum):
    """Where a closed round's strategies run."""

    # In the fleet actor, in the tick that closes the round: no worker process (110-270 MiB PSS
    # at 1,000-10,000 devices) and no copy of the round's reports in Ray's object store; the
    # strategies take 0.3-1.2 s of the actor's CPU at 3,000-10,000 reports (docs/benchmarks.md).
    ACTOR = "actor"
    # A Ray task a round, in a worker of its own: the actor goes on ingesting meanwhile.
    TASK = "task"


class LabelFreeRollout(StrEnum):
    """Which devices without labels take their cluster's promoted adapter."""

    DRIFTED = "drifted"  # only those whose label-free scores say they drifted (over 1.0)
    ALWAYS = "always"  # every member of the cluster


class WireEncoding(StrEnum):
    """shared.protocol.ArrayEncoding's values, repeated so --help needs no numpy/msgpack."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


@dataclass(frozen=True)
class FinetuneSettings:
    """What every fine-tune job asks of the device (shared.protocol.FinetuneParams)."""

    epochs: int = 30
    # Also what federated runs use: a smaller local step generalises better when devices hold
    # few labels (label-scarce: 97.1 % at 0.02 against 96.1 % at 0.05; docs/benchmarks.md).
    lr: float = 0.02
    rank: int = 4
    # ΔW trained directly: convex, and better than the A·B factors on the federation
    # benchmark (docs/benchmarks.md); the factors remain available (skip2-lora).
    method: str = "skip2-delta"
    batch_size: int = 20
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.rank < 1 or self.batch_size < 1:
            raise ConfigError("fine-tune epochs, rank and batch size must be >= 1")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise ConfigError(f"fine-tune lr must be in (0, 10], got {self.lr}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError("--max-samples must be >= 1")


@dataclass(frozen=True)
class CoordinatorConfig:
    mqtt: MqttSettings
    state_dir: Path
    # Names this coordinator among others on one broker or Ray cluster: its MQTT client id and
    # its fleet actor's name derive from it. None: a short hash of the state dir's absolute path.
    instance: str | None = None
    topic_root: str = "fleet"
    ray_address: str = LOCAL_RAY
    ray_namespace: str = "skipfleet"
    actor_name: str | None = None  # None: derived from the instance
    metrics_addr: str = DEFAULT_BIND
    metrics_port: int = DEFAULT_METRICS_PORT  # 0: any free port (logged)
    api_addr: str = DEFAULT_BIND
    api_port: int = DEFAULT_API_PORT
    api_token_file: Path | None = None  # None: API_TOKEN_FILE in the state dir
    # A process fleet's fault log (JSON lines its control endpoint appends to), shown on the
    # dashboard's timeline; None: the timeline shows what the coordinator itself saw.
    fleet_events_file: Path | None = None
    policy: SchedulerPolicy = field(default_factory=SchedulerPolicy)
    rollout: RolloutPolicy = field(default_factory=lambda: RolloutPolicy(min_canaries=2))
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    federation: FederationPolicy = field(default_factory=FederationPolicy)
    cluster_distance: float | None = DEFAULT_CLUSTER_DISTANCE  # None: one cluster per cohort
    trust: TrustBounds = field(default_factory=TrustBounds)
    label_free_rollout: LabelFreeRollout = LabelFreeRollout.DRIFTED
    algorithm: AggregationAlgorithm = AggregationAlgorithm.COORDINATE_MEDIAN
    aggregate_in: AggregationRunner = AggregationRunner.ACTOR
    encoding: WireEncoding = WireEncoding.FLOAT32
    chunk_limit: int = 131_072
    energy_period_s: float = 3600.0
    # Evaluate / apply jobs are quick; a device that does not answer in this time is stuck.
    command_timeout_s: float = 300.0
    # A device that failed to apply the cohort's adapter is asked again only after this long.
    reapply_backoff_s: float = 300.0
    # Finished jobs, reports' rows, ended rounds and runs are deleted once older than this
    # (coordinator.history); at least a day, and at least every window that reads them.
    history_s: float = DEFAULT_HISTORY_DAYS * DAY_S
    tick_interval_s: float = 0.5
    metrics_interval_s: float = 2.0
    log_level: str = "INFO"
    # The fleet state split by cohort over this many Ray actors, each with its own MQTT ingest
    # (coordinator.partitions); 1: one actor, fed by the driver's bridge, as always.
    partitions: int = 1
    # Per partition, a Ray custom resource its actor needs (pins it to the nodes that have it);
    # empty: Ray places the partitions.
    partition_resources: tuple[str, ...] = ()
    # Set on the config each partition actor runs with (coordinator.partitions.partition_config).
    partition_index: int | None = None
    # With an MQTT account and partitions > 1: partition I's password (coordinator.partition_
    # accounts: it connects as `<username>-pI`, password read from `<password-file>-pI`).
    partition_passwords: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        for name in ("metrics_port", "api_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"{name} {getattr(self, name)} is out of range")
        positive = (
            "energy_period_s",
            "command_timeout_s",
            "reapply_backoff_s",
            "tick_interval_s",
            "metrics_interval_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        self._check_history()
        if self.chunk_limit < 4096:
            raise ConfigError("--chunk-limit must be at least 4096 bytes")
        if not self.ray_address:
            raise ConfigError("--ray-address must be 'local', 'auto' or an address")
        if self.cluster_distance is not None and not self.cluster_distance > 0:
            raise ConfigError("--cluster-distance must be > 0 (or 'off')")
        if self.instance is not None and not INSTANCE_PATTERN.fullmatch(self.instance):
            raise ConfigError(f"--instance {self.instance!r}: use [a-z0-9-], at most 32")
        self._check_partitions()

    def _check_history(self) -> None:
        """History older than the retention is deleted: nothing still deciding on it may be."""
        if math.isnan(self.history_s):
            raise ConfigError("--history-days must be a number of days ('inf': kept for ever)")
        policy = self.policy
        windows = {  # each read of history, and how far back it reads
            "a day": DAY_S,
            "--trigger-cooldown-seconds": policy.trigger_cooldown_s,  # the last fine-tune
            # a failed job is retried while the request lives, counted from when it ended
            "a fine-tune request's life plus --job-timeout-seconds": policy.request_ttl_s
            + policy.job_timeout_s,
            "--canary-deadline-seconds": self.rollout.canary_deadline_s,  # the evaluations
            "the re-apply backoff": self.reapply_backoff_s,  # the last apply asked
        }
        name, longest = max(windows.items(), key=lambda item: item[1])
        if not self.history_s >= longest:
            days = longest / DAY_S
            raise ConfigError(
                f"--history-days {self.history_s / DAY_S:g} is shorter than {name} "
                f"({days:g} day{'' if days == 1 else 's'}): history must outlive it"
            )

    def _check_partitions(self) -> None:
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigError(f"--partitions must be 1 to {MAX_PARTITIONS}, got {self.partitions}")
        if self.partition_resources and len(self.partition_resources) != self.partitions:
            raise ConfigError(
                f"--partition-resources names {len(self.partition_resources)} resources for "
                f"{self.partitions} partitions: give one per partition, or none"
            )
        # Partitions share the device topics through MQTT 5 shared subscriptions ($share/...):
        # an MQTT 3.1.1 session cannot ask for them (mosquitto 2.0 serves them to v5 clients).
        if self.partitions > 1 and str(self.mqtt.protocol) != "5":
            raise ConfigError(
                "--partitions > 1 needs MQTT 5 shared subscriptions; the broker connection is "
                f"MQTT {self.mqtt.protocol}"
            )
        self._check_partition_accounts()

    def _check_partition_accounts(self) -> None:
        if self.partition_passwords and len(self.partition_passwords) != self.partitions:
            raise ConfigError(
                f"{len(self.partition_passwords)} partition passwords for {self.partitions} "
                "partitions"
            )
        # Every partition has an account of its own (`<username>-pI`): the coordinator's
        # password is for its own account, which no partition uses.
        if self.partitioned and self.mqtt.password is not None and not self.partition_passwords:
            raise ConfigError(
                f"--partitions {self.partitions} with the MQTT account {self.mqtt.username!r}: "
                f"each partition I connects as {self.mqtt.username}-pI with the password in "
                "<--password-file>-pI; give the password by --password-file (not the URL or "
                f"${ENV_PASSWORD})"
            )

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1

    @property
    def share_group(self) -> str | None:
        """The MQTT shared-subscription group of this coordinator's ingests (None: unshared)."""
        return f"skipfleet-{self.instance_name}" if self.partitioned else None

    @property
    def joins_cluster(self) -> bool:
        return self.ray_address != LOCAL_RAY

    @property
    def instance_name(self) -> str:
        return self.instance or instance_of(self.state_dir)

    @property
    def client_id(self) -> str:
        """The MQTT client id: one per coordinator instance, so two never take over each other's
        session (a broker with use_username_as_clientid uses the account name instead)."""
        return CLIENT_ID_PREFIX + self.instance_name + self._partition_suffix

    @property
    def fleet_actor_name(self) -> str:
        return (self.actor_name or CLIENT_ID_PREFIX + self.instance_name) + self._partition_suffix

    @property
    def _partition_suffix(self) -> str:
        return "" if self.partition_index is None else f"-p{self.partition_index}"

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.state_dir / API_TOKEN_FILE


def instance_of(state_dir: Path) -> str:
    """A coordinator's default instance name: 10 hex of its state dir's absolute path."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]


def optional_float(text: str) -> float | None:
    """A float, or `off`/`none` to switch the limit or trigger off."""
    if text.strip().lower() in ("off", "none", ""):
        return None
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


describe_type(optional_float, "a number or 'off'", none_as="off")  # for the config file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    add_policy_arguments(parser)
    add_federation_arguments(parser)
    add_job_arguments(parser)
    prepare_parser(parser, "coordinator", ENV_VARS)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker, the state, Ray and the served ports."""
    add = parser.add_argument
    add("--broker", default=DEFAULT_BROKER, help="mqtt://host:port or mqtts://host:port (TLS)")
    add("--username", help="MQTT user name (default: the URL's, else none)")
    add(
        "--password-file",
        help=f"file holding the MQTT password (default: none; else ${ENV_PASSWORD})",
    )
    add("--tls-ca", help="CA certificate for an mqtts:// broker (default: the system's)")
    add(
        "--session-expiry-seconds",
        type=int,
        default=86_400,
        help="MQTT v5 session: device messages wait this long for a stopped coordinator",
    )
    add("--state-dir", help="SQLite state and adapter files (required, no default)")
    add("--topic-root", default="fleet", help="first level of every topic (the agents')")
    add(
        "--ray-address",
        default=LOCAL_RAY,
        help="'local' (a 2-CPU Ray in this process), 'auto' (join the running cluster) or a "
        "cluster address",
    )
    add(
        "--instance",
        help="this coordinator's name among others on the broker and Ray (its MQTT client id "
        "and fleet actor derive from it); default: a hash of the state dir's path",
    )
    add("--ray-namespace", default="skipfleet", help="Ray namespace of the fleet actor")
    add("--actor-name", help="the fleet actor's name (default: derived from --instance)")
    add(
        "--partitions",
        type=int,
        default=1,
        help="split the fleet by cohort over this many Ray actors, each with its own MQTT "
        "ingest (MQTT 5 shared subscriptions); 1: one actor, as on one machine. With "
        "--username U --password-file F, partition I connects as U-pI with the password in F-pI",
    )
    add(
        "--partition-resources",
        default="",
        help="comma-separated Ray custom resources, one per partition, that pin each "
        "partition's actor to the nodes offering it (default: Ray places them)",
    )
    add("--metrics-addr", default=DEFAULT_BIND, help="/metrics bind address; 0.0.0.0: all hosts")
    add("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="0: any free port")
    add("--api-addr", default=DEFAULT_BIND, help="API bind address; 0.0.0.0: all hosts")
    add("--api-port", type=int, default=DEFAULT_API_PORT, help="0: any free port")
    add(
        "--api-token-file",
        help=f"the API's bearer token (made there if absent); default {API_TOKEN_FILE} in the "
        "state dir",
    )
    add(
        "--fleet-events-file",
        metavar="FILE",
        help="a process fleet's events.jsonl (faults injected with `skipfleet fleet`), for the "
        "dashboard's timeline (default: none)",
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """What starts a run, which devices may take part, and the canary rollout."""
    add = parser.add_argument
    defaults = SchedulerPolicy()
    canary = RolloutPolicy()
    add(
        "--max-concurrent-jobs",
        type=int,
        default=defaults.max_concurrent_jobs,
        help="fine-tune jobs running at once across the fleet",
    )
    add(
        "--accuracy-threshold",
        type=optional_float,
        default=defaults.accuracy_threshold,
        help="fine-tune a cohort when a device's accuracy is below this ('off')",
    )
    add(
        "--accuracy-drop-margin",
        type=optional_float,
        default=defaults.accuracy_drop_margin,
        help="...or when it drops this far below its accuracy after the last fine-tune ('off')",
    )
    add(
        "--drift-threshold",
        type=optional_float,
        default=DEFAULT_DRIFT_THRESHOLD,
        help="the BN1 drift score that starts a run ('off')",
    )
    add(
        "--label-free-threshold",
        type=optional_float,
        default=defaults.label_free_threshold,
        help="start a run when a device's calibrated label-free score exceeds this (1.0: the "
        "base model's own calibrated threshold; 'off')",
    )
    add(
        "--label-free-signal",
        choices=[s.value for s in LabelFreeSignal],
        default=defaults.label_free_signal.value,
        help="which calibrated score the label-free trigger reads",
    )
    add(
        "--label-free-margin",
        type=float,
        default=defaults.label_free_margin,
        help="after a run, the score must exceed its value when the run began by this much",
    )
    add(
        "--label-free-seconds",
        type=float,
        default=defaults.label_free_persistence_s,
        help="...continuously for this long before it starts a run",
    )
    add(
        "--drift-margin",
        type=float,
        default=defaults.drift_margin,
        help="after a fine-tune, drift must rise this much above its value then to fire again",
    )
    add(
        "--trigger-cooldown-seconds",
        type=float,
        default=defaults.trigger_cooldown_s,
        help="no automatic job for a device that had one this recently",
    )
    add(
        "--heartbeat-timeout-seconds",
        type=float,
        default=defaults.heartbeat_timeout_s,
        help="a device silent this long is not given jobs",
    )
    add(
        "--max-temperature",
        type=optional_float,
        default=defaults.max_temperature_c,
        help="°C above which a device is not given jobs ('off')",
    )
    add(
        "--energy-budget-joules",
        type=optional_float,
        default=defaults.energy_budget_j,
        help="per device per --energy-period-seconds ('off')",
    )
    add(
        "--energy-period-seconds",
        type=float,
        default=3600.0,
        help="the window of --energy-budget-joules",
    )
    add(
        "--canary-fraction",
        type=float,
        default=canary.canary_fraction,
        help="share of a cohort's devices that try a new adapter first",
    )
    add(
        "--canary-margin",
        type=float,
        default=canary.max_accuracy_regression,
        help="promote unless the canaries' mean accuracy drops by more than this",
    )
    add(
        "--canary-device-margin",
        type=float,
        default=canary.max_device_regression,
        help="...and unless one canary's own accuracy drops by more than this",
    )
    add(
        "--canary-deadline-seconds",
        type=float,
        default=canary.canary_deadline_s,
        help="canaries that have not answered by then count as failed",
    )
    add(
        "--min-canaries",
        type=int,
        default=DEFAULT_MIN_CANARIES,
        help="labelled devices a canary needs before devices without labels get an adapter",
    )


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Jobs, fine-tuning, aggregation and the wire."""
    add = parser.add_argument
    defaults = SchedulerPolicy()
    tune = FinetuneSettings()
    add(
        "--job-timeout-seconds",
        type=float,
        default=defaults.job_timeout_s,
        help="a fine-tune job not finished by then timed out",
    )
    add(
        "--max-attempts",
        type=int,
        default=defaults.max_attempts,
        help="tries of a fine-tune request before it fails",
    )
    add(
        "--quarantine-after",
        type=int,
        default=defaults.quarantine_after,
        help="jobs a device lets time out in a row before it is left alone for a while",
    )
    add(
        "--quarantine-seconds",
        type=float,
        default=defaults.quarantine_s,
        help="...for this long",
    )
    add(
        "--round-deadline-seconds",
        type=float,
        default=defaults.round_deadline_s,
        help="a round aggregates what it has by then",
    )
    add(
        "--min-completion-ratio",
        type=float,
        default=defaults.min_completion_ratio,
        help="share of a round's devices that must report for it to aggregate",
    )
    add(
        "--command-timeout-seconds",
        type=float,
        default=300.0,
        help="an evaluate/apply job not answered by then: the device is stuck",
    )
    add(
        "--history-days",
        type=float,
        default=DEFAULT_HISTORY_DAYS,
        help="finished jobs and their commands, reports' rows, ended rounds and runs older than "
        "this are deleted (devices, adapter versions and rollouts are kept); at least a day and "
        "every window that reads them (refused otherwise, naming it); 'inf': kept for ever",
    )
    add("--epochs", type=int, default=tune.epochs, help="epochs of a device's fine-tune job")
    add("--lr", type=float, default=tune.lr, help="learning rate of fine-tuning")
    add("--rank", type=int, default=tune.rank, help="LoRA rank of the adapters")
    add(
        "--method",
        default=tune.method,
        help="fine-tuning method the devices run (skip2-delta: ΔW trained directly; skip2-lora: "
        "the A·B factors)",
    )
    add(
        "--max-samples",
        type=int,
        help="rows of its data a device trains on at most (default: all)",
    )
    add(
        "--algorithm",
        choices=[a.value for a in AggregationAlgorithm],
        default=AggregationAlgorithm.COORDINATE_MEDIAN.value,
        help="how a round aggregates the devices' updates",
    )
    add(
        "--aggregate-in",
        choices=[r.value for r in AggregationRunner],
        default=AggregationRunner.ACTOR.value,
        help="where a round's aggregation runs: in the fleet actor (no worker, no copy of the "
        "reports) or a Ray task of its own (the actor ingests meanwhile)",
    )
    add(
        "--adapter-encoding",
        choices=[e.value for e in WireEncoding],
        default=WireEncoding.FLOAT32.value,
        help="number format of adapters sent to devices",
    )
    add("--chunk-limit", type=int, default=131_072, help="largest single publish, bytes")
    add("--tick-seconds", type=float, default=0.5, help="period of the scheduler's tick")
    add(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="least severe log messages shown",
    )


def add_federation_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    run = FederationPolicy()
    add("--steps-per-round", type=int, default=run.steps, help="SGD steps a device runs a round")
    add("--max-rounds", type=int, default=run.max_rounds, help="rounds a run may take at most")
    add(
        "--min-gain",
        type=float,
        default=run.min_gain,
        help="a run goes on while an aggregate gains this much hold-out accuracy...",
    )
    add(
        "--min-loss-drop",
        type=float,
        default=run.min_loss_drop,
        help="...or lowers the hold-out cross-entropy by this share",
    )
    add("--patience", type=int, default=run.patience, help="rounds without either, then stop")
    trust = TrustBounds()
    add(
        "--max-weight-ratio",
        type=optional_float,
        default=trust.max_weight_ratio,
        help="a report weighs at most this times the median of the others' samples ('off')",
    )
    add(
        "--clip-factor",
        type=optional_float,
        default=trust.clip_factor,
        help="clip a report's update to this times the others' median update norm ('off')",
    )
    add(
        "--cluster-distance",
        type=optional_float,
        default=DEFAULT_CLUSTER_DISTANCE,
        help="devices whose signatures lie within this many in-distribution standard "
        "deviations share an adapter ('off': one adapter per cohort)",
    )
    add(
        "--label-free-rollout",
        choices=[r.value for r in LabelFreeRollout],
        default=LabelFreeRollout.DRIFTED.value,
        help="devices without labels take their cluster's adapter only when they drifted, "
        "or always",
    )


def from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> CoordinatorConfig:
    """Flags, environment, config file and defaults merged (shared.config_file: flag > env >
    file > default) into the frozen config. Raises ConfigFileError for a file or variable that
    cannot be read, ConfigError for values the coordinator cannot use."""
    args = resolve_args(args, environ)
    state_dir = args.state_dir
    if not state_dir:
        raise ConfigError(
            f"--state-dir is required (or set {ENV_STATE_DIR}, or state_dir in the config "
            "file's [coordinator] table)"
        )
    try:
        mqtt = _mqtt_settings(args, environ)
        return CoordinatorConfig(
            mqtt=mqtt,
            state_dir=Path(state_dir),
            instance=args.instance,
            topic_root=args.topic_root,
            ray_address=args.ray_address or LOCAL_RAY,
            ray_namespace=args.ray_namespace,
            actor_name=args.actor_name,
            metrics_addr=args.metrics_addr,
            metrics_port=args.metrics_port,
            api_addr=args.api_addr,
            api_port=args.api_port,
            api_token_file=_optional_path(args.api_token_file),
            fleet_events_file=_optional_path(args.fleet_events_file),
            policy=_policy(args),
            rollout=RolloutPolicy(
                canary_fraction=args.canary_fraction,
                max_accuracy_regression=args.canary_margin,
                max_device_regression=args.canary_device_margin,
                canary_deadline_s=args.canary_deadline_seconds,
                min_canaries=args.min_canaries,
            ),
            federation=FederationPolicy(
                max_rounds=args.max_rounds,
                min_gain=args.min_gain,
                min_loss_drop=args.min_loss_drop,
                patience=args.patience,
                steps=args.steps_per_round,
            ),
            cluster_distance=args.cluster_distance,
            trust=TrustBounds(max_weight_ratio=args.max_weight_ratio, clip_factor=args.clip_factor),
            label_free_rollout=LabelFreeRollout(args.label_free_rollout),
            finetune=FinetuneSettings(
                epochs=args.epochs,
                lr=args.lr,
                rank=args.rank,
                method=args.method,
                max_samples=args.max_samples,
            ),
            algorithm=AggregationAlgorithm(args.algorithm),
            aggregate_in=AggregationRunner(args.aggregate_in),
            encoding=WireEncoding(args.adapter_encoding),
            chunk_limit=args.chunk_limit,
            energy_period_s=args.energy_period_seconds,
            command_timeout_s=args.command_timeout_seconds,
            history_s=args.history_days * DAY_S,
            tick_interval_s=args.tick_seconds,
            log_level=args.log_level,
            partitions=args.partitions,
            partition_resources=_names(args.partition_resources),
            partition_passwords=_partition_passwords(args, mqtt),
        )
    except ConfigError:
        raise
    except ValueError as err:  # the policies' own checks
        raise ConfigError(str(err)) from None


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def _optional_path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _policy(args: argparse.Namespace) -> SchedulerPolicy:
    return SchedulerPolicy(
        max_concurrent_jobs=args.max_concurrent_jobs,
        accuracy_threshold=args.accuracy_threshold,
        accuracy_drop_margin=args.accuracy_drop_margin,
        drift_threshold=args.drift_threshold,
        drift_margin=args.drift_margin,
        label_free_threshold=args.label_free_threshold,
        label_free_signal=LabelFreeSignal(args.label_free_signal),
        label_free_margin=args.label_free_margin,
        label_free_persistence_s=args.label_free_seconds,
        trigger_cooldown_s=args.trigger_cooldown_seconds,
        heartbeat_timeout_s=args.heartbeat_timeout_seconds,
        max_temperature_c=args.max_temperature,
        energy_budget_j=args.energy_budget_joules,
        job_timeout_s=args.job_timeout_seconds,
        max_attempts=args.max_attempts,
        quarantine_after=args.quarantine_after,
        quarantine_s=args.quarantine_seconds,
        round_deadline_s=args.round_deadline_seconds,
        min_completion_ratio=args.min_completion_ratio,
    )


def _mqtt_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> MqttSettings:
    from shared.mqtt import parse_broker_url

    url = args.broker or DEFAULT_BROKER
    overrides: dict[str, Any] = {
        "session_expiry_s": args.session_expiry_seconds,
        "tls_ca": args.tls_ca,
    }
    username = args.username
    if username:
        overrides["username"] = username
    try:
        settings = parse_broker_url(url, **overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if _partition_accounts(args, settings):
        return settings  # no partition uses the coordinator's own account
    password = _password(args, environ)
    return settings if password is None else replace(settings, password=password)


def _partition_accounts(args: argparse.Namespace, mqtt: MqttSettings) -> bool:
    """Whether every partition connects with an account of its own (partition_accounts)."""
    return args.partitions > 1 and mqtt.username is not None and bool(args.password_file)


def _partition_passwords(args: argparse.Namespace, mqtt: MqttSettings) -> tuple[str, ...]:
    """Each partition's password, from `<password-file>-pI`; a missing file is refused here,
    at start-up, naming it."""
    if not _partition_accounts(args, mqtt):
        return ()
    passwords = []
    for index in range(args.partitions):
        path = partition_password_file(args.password_file, index)
        where = f"partition {index}'s password file"
        try:
            passwords.append(read_secret_file(path, where))
        except SecretFileError as err:
            account = partition_username(mqtt.username or "", index)
            raise ConfigError(
                f"{err}; partition {index} connects as {account} (deploy/mosquitto/"
                "make-accounts.sh --partitions N makes the accounts and their files)"
            ) from None
    return tuple(passwords)


def _password(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """As the agent's: the command line before the environment before the config file, and
    within the environment a file before the literal $SKIPFLEET_MQTT_PASSWORD."""
    # No --password flag: a password on the command line is visible in `ps`.
    literal = environ.get(ENV_PASSWORD) or None
    source = args._config_sources["password_file"]
    if not args.password_file or (literal and source_rank(source) > source_rank("env")):
        return literal
    where = "--password-file" if source == "flag" else source
    try:
        return read_secret_file(args.password_file, where)
    except SecretFileError as err:
        raise ConfigError(str(err)) from None
