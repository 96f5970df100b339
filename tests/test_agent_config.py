"""Configuration: parsed once, environment fallbacks, clear errors; and the reconnect backoff."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.config import (
    AgentConfig,
    Ina219Config,
    add_arguments,
    device_id_from_hostname,
    from_args,
)
from agent.errors import ConfigError, ExitCode
from shared.mqtt import MqttProtocol, MqttSettings


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), environ or {})


REQUIRED = ["--data", "d.npz", "--base-model", "m.npz", "--state-dir", "state"]


def test_command_line_values_land_in_a_frozen_config():
    config = parse(
        [
            "--device-id",
            "pi-7",
            "--broker",
            "mqtt://broker:1884",
            "--mqtt-version",
            "3.1.1",
            "--heartbeat-seconds",
            "5",
            *REQUIRED,
        ]
    )
    assert config.device_id == "pi-7"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.tls) == ("broker", 1884, False)
    assert config.mqtt.protocol is MqttProtocol.V311
    assert config.mqtt.session_expiry_s > 0  # persistent session by default
    assert config.heartbeat_seconds == 5
    with pytest.raises(AttributeError):
        config.device_id = "other"


def test_environment_fills_what_the_command_line_leaves_out():
    env = {
        "SKIPFLEET_DEVICE_ID": "env-dev",
        "SKIPFLEET_BROKER": "mqtts://b",
        "SKIPFLEET_DEVICE_DATA": "/data/device.npz",
        "SKIPFLEET_BASE_MODEL": "/m.npz",
        "SKIPFLEET_STATE_DIR": "/s",
        "SKIPFLEET_MQTT_USERNAME": "u",
        "SKIPFLEET_MQTT_PASSWORD": "secret",
    }
    config = parse([], env)
    assert (config.device_id, config.mqtt.port, config.mqtt.tls) == ("env-dev", 8883, True)
    assert str(config.data_path) == "/data/device.npz" and config.mqtt.password == "secret"
    assert "secret" not in repr(config)


def test_password_file_wins(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    config = parse(
        ["--device-id", "d", "--username", "u", "--password-file", str(tmp_path / "pw"), *REQUIRED],
        {"SKIPFLEET_MQTT_PASSWORD": "env"},
    )
    assert config.mqtt.password == "from-file"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device-id", "Bad_Id"], "device id"),
        (["--device-id", "d", "--broker", "http://x"], "scheme"),
        (["--device-id", "d", "--holdout-fraction", "1.5"], "holdout"),
        (["--device-id", "d", "--password", "p"], "username"),
        (["--device-id", "d", "--ina219", "1:0x99"], "address"),
        (["--device-id", "d", "--tls-ca", "/no/such/ca.pem"], "tls-ca"),
    ],
)
def test_bad_values_raise_config_error_with_usage_exit_code(argv, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse([*argv, *REQUIRED])
    assert caught.value.exit_code is ExitCode.USAGE


def test_missing_paths_name_the_flag_and_variable():
    with pytest.raises(ConfigError, match=r"--data is required.*SKIPFLEET_DEVICE_DATA"):
        parse(["--device-id", "d"])


def test_device_id_from_hostname():
    assert device_id_from_hostname("Skipfleet_Agent_3") == "skipfleet-agent-3"


def test_ina219_spec():
    assert Ina219Config.parse("1:0x40") == Ina219Config(1, 0x40, 0.1)
    assert Ina219Config.parse("0:65:0.05").shunt_ohms == 0.05


def test_config_can_be_built_directly_and_validates():
    with pytest.raises(ConfigError):
        AgentConfig(
            device_id="x",
            mqtt=MqttSettings("h"),
            data_path=Path("d"),
            base_model_path=Path("m"),
            state_dir=Path("s"),
            spool_max_messages=1,
        )


def test_the_device_data_comes_from_its_own_variable_not_the_data_sets_folder():
    env = {
        "SKIPFLEET_DATA_DIR": "/public/data",
        "SKIPFLEET_BASE_MODEL": "m",
        "SKIPFLEET_STATE_DIR": "s",
    }
    with pytest.raises(ConfigError, match="SKIPFLEET_DEVICE_DATA"):
        parse(["--device-id", "d"], env)
    config = parse(["--device-id", "d"], {**env, "SKIPFLEET_DEVICE_DATA": "/var/dev.npz"})
    assert str(config.data_path) == "/var/dev.npz"


def test_password_file_from_the_environment(tmp_path):
    (tmp_path / "secret").write_text("from-secret\n")
    env = {
        "SKIPFLEET_MQTT_USERNAME": "u",
        "SKIPFLEET_MQTT_PASSWORD_FILE": str(tmp_path / "secret"),
        "SKIPFLEET_MQTT_PASSWORD": "plain",
    }
    assert parse(["--device-id", "d", *REQUIRED], env).mqtt.password == "from-secret"
    # The command line comes first: its literal password beats the environment's file.
    argv = ["--device-id", "d", "--password", "flag", *REQUIRED]
    assert parse(argv, env).mqtt.password == "flag"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the MQTT password: No such file"), ("\n", "is empty")],
)
def test_an_unusable_password_file_is_a_clear_config_error(tmp_path, content, message):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    env = {"SKIPFLEET_MQTT_USERNAME": "u", "SKIPFLEET_MQTT_PASSWORD_FILE": str(path)}
    with pytest.raises(ConfigError, match=message) as caught:
        parse(["--device-id", "d", *REQUIRED], env)
    assert "SKIPFLEET_MQTT_PASSWORD_FILE" in str(caught.value) and str(path) in str(caught.value)
    assert caught.value.exit_code is ExitCode.USAGE


def test_an_unreadable_password_file_flag_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--password-file .*: cannot read"):
        parse(["--device-id", "d", "--password-file", str(tmp_path), *REQUIRED])  # a directory


def test_simulation_and_reconcile_options():
    config = parse(
        [
            "--device-id", "d", "--stream-rows", "32", "--drift-at", "90",
            "--desired-retry-seconds", "2.5", "--desired-max-fetches", "3", *REQUIRED,
        ]
    )  # fmt: skip
    assert (config.stream_rows, config.drift_at_seconds) == (32, 90.0)
    assert (config.desired_retry_seconds, config.desired_max_fetches) == (2.5, 3)
    defaults = parse(["--device-id", "d", *REQUIRED])
    assert (defaults.stream_rows, defaults.drift_at_seconds) == (8, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stream-rows", "-1"], "stream-rows"),
        (["--drift-at", "-5"], "drift-at"),
        (["--drift-at", "nan"], "drift-at"),
        (["--desired-retry-seconds", "0"], "desired-retry-seconds"),
        (["--desired-max-fetches", "0"], "desired-max-fetches"),
    ],
)
def test_bad_simulation_and_reconcile_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--device-id", "d", *argv, *REQUIRED])
