"""The coordinator's configuration (arguments, environment, checks), its CLI's early exits, and
`skipfleet status` — none of which needs Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator import cli, status_cli
from coordinator.api import ApiServer, FleetApi
from coordinator.clock import ManualClock
from coordinator.config import (
    DAY_S,
    DEFAULT_API_PORT,
    DEFAULT_METRICS_PORT,
    AggregationAlgorithm,
    ConfigError,
    from_args,
)
from coordinator.partitions import partition_config
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.http_auth import RequestGuard
from tests.coord_fleet_helpers import SimDevice, make_config

GUARD = RequestGuard("a-test-token-of-32-characters-xx", "in a test")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


def test_history_days_sets_how_long_history_is_kept(tmp_path):
    config = from_args(parse("--state-dir", str(tmp_path), "--history-days", "45"), {})
    assert config.history_s == 45 * DAY_S


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--history-days", "0.5"), "a day"),
        (("--history-days", "2", "--canary-deadline-seconds", str(3 * DAY_S)), "--canary-dead"),
        (("--history-days", "1", "--trigger-cooldown-seconds", str(1.5 * DAY_S)), "--trigger-co"),
        (("--history-days", "1", "--job-timeout-seconds", str(DAY_S)), "a fine-tune request"),
    ],
)
def test_history_shorter_than_a_window_that_reads_it_is_refused_naming_it(tmp_path, argv, named):
    with pytest.raises(ConfigError, match=f"is shorter than {named}"):
        from_args(parse("--state-dir", str(tmp_path), *argv), {})


def test_windows_that_read_no_history_do_not_bound_it_and_inf_keeps_it_for_ever(tmp_path):
    monthly = ("--energy-period-seconds", str(31 * DAY_S), "--quarantine-seconds", str(40 * DAY_S))
    assert from_args(parse("--state-dir", str(tmp_path), *monthly), {}).history_s == 30 * DAY_S
    forever = from_args(parse("--state-dir", str(tmp_path), "--history-days", "inf"), {})
    assert forever.history_s == float("inf")
    with pytest.raises(ConfigError, match="must be a number of days"):
        from_args(parse("--state-dir", str(tmp_path), "--history-days", "nan"), {})


def test_defaults(tmp_path):
    config = from_args(parse("--state-dir", str(tmp_path)), {})
    assert config.ray_address == "local" and not config.joins_cluster
    assert (config.metrics_port, config.api_port) == (DEFAULT_METRICS_PORT, DEFAULT_API_PORT)
    assert config.mqtt.url == "mqtt://localhost:1883" and config.mqtt.session_expiry_s > 0
    assert config.algorithm is AggregationAlgorithm.COORDINATE_MEDIAN  # robust: issue 10
    assert config.policy.drift_threshold is None and config.policy.max_concurrent_jobs == 2
    # the federation's defaults: calibrated label-free triggers, clusters, runs of rounds,
    # ΔW trained directly, two labelled canaries before a device that cannot measure
    assert config.policy.label_free_threshold == 1.0
    assert config.cluster_distance == 0.4 and config.finetune.method == "skip2-delta"
    assert (config.federation.max_rounds, config.federation.steps) == (10, 50)
    assert config.rollout.min_canaries == 2


def test_clustering_and_the_label_free_trigger_can_be_switched_off(tmp_path):
    config = from_args(
        parse("--state-dir", str(tmp_path), "--cluster-distance", "off",
              "--label-free-threshold", "off", "--max-rounds", "1", "--min-canaries", "3"),
        {},
    )  # fmt: skip
    assert config.cluster_distance is None and config.policy.label_free_threshold is None
    assert config.federation.max_rounds == 1 and config.rollout.min_canaries == 3


def test_arguments_win_over_the_environment_which_fills_the_gaps(tmp_path):
    password = tmp_path / "secret"
    password.write_text("s3cret\n")
    environ = {
        "SKIPFLEET_BROKER": "mqtts://broker.example:8884",
        "SKIPFLEET_MQTT_USERNAME": "coordinator",
        "SKIPFLEET_COORDINATOR_STATE_DIR": str(tmp_path / "from-env"),
        "SKIPFLEET_RAY_ADDRESS": "auto",
    }
    config = from_args(parse("--password-file", str(password), "--api-port", "9000"), environ)
    assert config.mqtt.tls and config.mqtt.port == 8884
    assert (config.mqtt.username, config.mqtt.password) == ("coordinator", "s3cret")
    assert config.state_dir == tmp_path / "from-env" and config.joins_cluster
    assert config.api_port == 9000


def write_partition_secrets(tmp_path, partitions: int) -> Path:
    """`secret-p0` .. for the partitions; `secret` itself (the coordinator's) is not made."""
    for index in range(partitions):
        (tmp_path / f"secret-p{index}").write_text(f"pw{index}\n")
    return tmp_path / "secret"


def test_each_partition_connects_with_its_own_account_and_password_file(tmp_path):
    secret = write_partition_secrets(tmp_path, 2)
    config = from_args(
        parse("--state-dir", str(tmp_path / "state"), "--username", "coordinator-east",
              "--password-file", str(secret), "--partitions", "2"),
        {},
    )  # fmt: skip
    parts = [partition_config(config, i) for i in range(2)]
    assert [(p.mqtt.username, p.mqtt.password) for p in parts] == [
        ("coordinator-east-p0", "pw0"), ("coordinator-east-p1", "pw1"),
    ]  # fmt: skip
    assert config.mqtt.password is None  # the coordinator's own file is not read
    assert "pw0" not in repr(config)


def test_one_partition_connects_with_the_coordinators_own_account(tmp_path):
    write_partition_secrets(tmp_path, 2)
    (tmp_path / "secret").write_text("own\n")
    config = from_args(
        parse("--state-dir", str(tmp_path / "state"), "--username", "coordinator",
              "--password-file", str(tmp_path / "secret")),
        {},
    )  # fmt: skip
    assert (config.mqtt.username, config.mqtt.password) == ("coordinator", "own")
    assert config.partition_passwords == ()


def test_partitions_without_an_account_share_the_anonymous_connection(tmp_path):
    config = from_args(parse("--state-dir", str(tmp_path), "--partitions", "2"), {})
    assert {partition_config(config, i).mqtt.username for i in range(2)} == {None}


def test_a_missing_partition_password_file_is_refused_naming_it(tmp_path):
    secret = write_partition_secrets(tmp_path, 2)
    with pytest.raises(ConfigError) as refused:
        from_args(
            parse("--state-dir", str(tmp_path / "state"), "--username", "coordinator",
                  "--password-file", str(secret), "--partitions", "3"),
            {},
        )  # fmt: skip
    message = str(refused.value)
    assert f"partition 2's password file {secret}-p2: cannot read" in message
    assert "connects as coordinator-p2" in message and "--partitions N" in message


def test_partitions_with_a_password_not_from_a_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="each partition I connects as coordinator-pI"):
        from_args(
            parse("--state-dir", str(tmp_path), "--username", "coordinator", "--partitions", "2"),
            {"SKIPFLEET_MQTT_PASSWORD": "literal"},
        )


def test_the_cli_exits_64_naming_a_missing_partition_password_file(tmp_path, capsys):
    secret = write_partition_secrets(tmp_path, 1)
    argv = ("--state-dir", str(tmp_path / "state"), "--username", "coordinator",
            "--password-file", str(secret), "--partitions", "2")  # fmt: skip
    assert cli.main(parse(*argv)) == 64
    assert f"{secret}-p1" in capsys.readouterr().err


def test_policy_knobs_and_switching_triggers_off(tmp_path):
    config = from_args(
        parse(
            "--state-dir",
            str(tmp_path),
            "--max-concurrent-jobs",
            "5",
            "--accuracy-threshold",
            "off",
            "--drift-threshold",
            "3.5",
            "--energy-budget-joules",
            "1200",
            "--canary-fraction",
            "0.25",
            "--canary-margin",
            "0.02",
            "--min-completion-ratio",
            "0.7",
            "--round-deadline-seconds",
            "300",
            "--algorithm",
            "naive-fedavg",
            "--adapter-encoding",
            "int8",
            "--epochs",
            "10",
        ),
        {},
    )
    assert config.policy.max_concurrent_jobs == 5 and config.policy.accuracy_threshold is None
    assert config.policy.drift_threshold == 3.5 and config.policy.energy_budget_j == 1200
    assert config.rollout.canary_fraction == 0.25 and config.rollout.max_accuracy_regression == 0.02
    assert config.policy.min_completion_ratio == 0.7 and config.policy.round_deadline_s == 300
    assert config.algorithm.value == "naive-fedavg" and config.encoding.value == "int8"
    assert config.finetune.epochs == 10


@pytest.mark.parametrize(
    "argv",
    [
        (),  # no state dir
        ("--broker", "http://nope"),
        ("--min-completion-ratio", "0"),
        ("--canary-fraction", "2"),
        ("--api-port", "70000"),
        ("--lr", "-1"),
        ("--chunk-limit", "100"),
        ("--password-file", "/nonexistent/secret"),
        ("--max-concurrent-jobs", "0"),
    ],
)
def test_bad_configuration_is_a_config_error(tmp_path, argv):
    state = () if argv == () else ("--state-dir", str(tmp_path))
    with pytest.raises(ConfigError):
        from_args(parse(*state, *argv), {})


def test_the_cli_exits_64_on_bad_configuration(capsys):
    assert cli.main(parse("--state-dir", "/tmp/x", "--broker", "ftp://x")) == 64
    assert "invalid configuration" in capsys.readouterr().err


def test_the_cli_exits_73_when_the_state_dir_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(parse("--state-dir", str(blocker / "state"))) == 73
    assert "state dir" in capsys.readouterr().err


def test_status_formats_the_fleet():
    table = status_cli.format_table(
        [
            {
                "device_id": "pi-1",
                "online": True,
                "labelled": True,
                "cluster": "c2",
                "running": {"version": 3, "origin": "fleet", "why": "runs cluster c2's v3"},
                "accuracy_before": 0.612,
                "accuracy_after": 0.934,
                "power_w": 1.25,
                "energy_j": 120.0,
                "confidence_score": 1.71,
                "feature_score": 2.5,
                "clock_offset_s": 3600.04,
                "seen_seconds_ago": 4.2,
            },
            {
                "device_id": "pi-3",
                "online": True,
                "labelled": False,
                "running": {"version": None, "origin": "personal", "why": None},
                "seen_seconds_ago": 1.0,
            },
            {"device_id": "pi-22", "online": False, "seen_seconds_ago": None},
        ]
    )
    header, first, third, second = table.splitlines()
    assert header.split() == [
        "DEVICE", "ONLINE", "LABELS", "CLUSTER", "RUNS", "ACC", "BEFORE", "ACC", "AFTER",
        "POWER", "W", "ENERGY", "J", "DRIFT", "CLOCK", "S", "LAST", "SEEN", "WHY",
    ]  # fmt: skip
    assert first.split() == [
        "pi-1", "yes", "yes", "c2", "v3", "(c2)", "0.612", "0.934", "1.25", "120.0", "2.50",
        "3600.0", "4s", "ago", "runs", "cluster", "c2's", "v3",
    ]  # fmt: skip
    assert third.split()[:5] == ["pi-3", "yes", "no", "-", "personal"]
    assert second.split() == ["pi-22", "no", "yes", "-", "base", "-", "-", "-", "-", "-", "-",
                              "never", "-"]  # fmt: skip
    assert status_cli.format_table([]) == "no devices known yet"
    assert [status_cli.ago(s) for s in (59, 61, 7200, 90000)] == [
        "59s ago",
        "1m ago",
        "2h ago",
        "1d ago",
    ]


def test_status_reads_the_api(tmp_path: Path, capsys):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    device = SimDevice("pi-1", clock)
    service.ingest([device.presence(), device.heartbeat()])
    server = ApiServer(FleetApi(LocalFleetPort(service)), "127.0.0.1", 0, GUARD)
    server.start()
    try:
        args = argparse.Namespace(
            api=f"http://127.0.0.1:{server.port}/", timeout=10.0, api_token_file=None
        )
        assert status_cli.main(args) == 0
        assert "pi-1" in capsys.readouterr().out
    finally:
        server.stop()
        service.close()
    args = argparse.Namespace(
        api=f"http://127.0.0.1:{server.port}", timeout=2.0, api_token_file=None
    )
    assert status_cli.main(args) == status_cli.EXIT_UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err


def test_a_round_aggregates_in_the_actor_unless_told_to_use_a_ray_task(tmp_path):
    from coordinator.aggregate_task import LocalAggregator
    from coordinator.config import AggregationRunner
    from coordinator.ray_runtime import RayAggregator, aggregator_for

    default = from_args(parse("--state-dir", str(tmp_path)), {})
    assert default.aggregate_in is AggregationRunner.ACTOR
    assert isinstance(aggregator_for(default), LocalAggregator)
    task = from_args(parse("--state-dir", str(tmp_path), "--aggregate-in", "task"), {})
    assert isinstance(aggregator_for(task), RayAggregator)
    with pytest.raises(SystemExit):
        parse("--state-dir", str(tmp_path), "--aggregate-in", "cloud")
