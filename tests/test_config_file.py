"""The one config file (shared.config_file): flag > environment > file > default for the agent,
the coordinator and simulate; `skipfleet config show` with each value's source; clear errors
(exit 2) for unknown keys and wrong types; every option's help shows its default."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from shared.config_file import ENV_CONFIG, SECTIONS, resolve
from skipfleet.cli import SUBCOMMANDS, main
from skipfleet.processes import child_env

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "skipfleet.example.toml"
REQUIRED = ["--data", "d.npz", "--base-model", "m.npz", "--state-dir", "state"]


def parser_of(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"skipfleet {command}")
    importlib.import_module(SUBCOMMANDS[command][0]).configure(parser)
    return parser


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "skipfleet.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch):
    """The tests' own environment decides: none of the variables the commands read."""
    for command in SECTIONS:
        spec = parser_of(command).parse_args([])._config_spec
        for option in spec.options:
            if option.env:
                monkeypatch.delenv(option.env, raising=False)
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv("SKIPFLEET_MQTT_PASSWORD", raising=False)


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(tmp_path):
    from agent.config import from_args

    path = write(
        tmp_path,
        '[agent]\nbroker = "mqtt://from-file:1883"\nusername = "file-user"\n'
        'heartbeat_seconds = 7\ncohort = "file-cohort"\ndata = "file.npz"\n'
        'base_model = "file-base.npz"\nstate_dir = "file-state"\n',
    )
    environ = {"SKIPFLEET_BROKER": "mqtt://from-env:1883", "SKIPFLEET_MQTT_USERNAME": "env-user"}
    argv = ["--config", str(path), "--username", "flag-user", "--topic-root", "fleet"]
    args = parser_of("agent").parse_args(argv)
    resolved = resolve(args, environ)
    # a flag that repeats the default is still the flag
    assert resolved.sources["topic_root"] == "flag" and resolved.values["topic_root"] == "fleet"
    assert resolved.values["username"] == "flag-user" and resolved.sources["username"] == "flag"
    assert resolved.sources["broker"] == "env:SKIPFLEET_BROKER"
    assert resolved.values["heartbeat_seconds"] == 7.0
    assert resolved.sources["heartbeat_seconds"] == f"file:{path}"
    assert resolved.values["seed"] == 0 and resolved.sources["seed"] == "default"
    config = from_args(args, environ)  # the same merge lands in the frozen dataclass
    assert (config.mqtt.host, config.mqtt.username) == ("from-env", "flag-user")
    assert (config.heartbeat_seconds, config.cohort) == (7.0, "file-cohort")
    assert config.data_path == Path("file.npz") and config.will_delay_seconds == 5


def test_the_file_comes_from_the_environment_when_no_flag_names_one(tmp_path):
    from coordinator.config import from_args

    path = write(tmp_path, f'[coordinator]\nstate_dir = "{tmp_path}"\napi_port = 9100\n')
    config = from_args(parser_of("coordinator").parse_args([]), {ENV_CONFIG: str(path)})
    assert config.api_port == 9100 and config.state_dir == tmp_path
    flag = from_args(parser_of("coordinator").parse_args(["--api-port", "9200"]),
                     {ENV_CONFIG: str(path)})  # fmt: skip
    assert flag.api_port == 9200


def test_the_coordinator_reads_its_password_file_from_the_environment_or_the_file(tmp_path):
    from coordinator.config import ConfigError, from_args

    (tmp_path / "pw").write_text("coordinator-secret\n")
    args = parser_of("coordinator").parse_args(["--state-dir", str(tmp_path), "--username", "c"])
    environ = {"SKIPFLEET_MQTT_PASSWORD_FILE": str(tmp_path / "pw"),
               "SKIPFLEET_MQTT_PASSWORD": "literal"}  # fmt: skip
    assert from_args(args, environ).mqtt.password == "coordinator-secret"
    (tmp_path / "empty").write_text("\n")
    environ["SKIPFLEET_MQTT_PASSWORD_FILE"] = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"SKIPFLEET_MQTT_PASSWORD_FILE .*empty"):
        from_args(args, environ)
    # the agent's order: the environment's password before the config file's password file
    path = write(tmp_path, f'[coordinator]\npassword_file = "{tmp_path / "pw"}"\n')
    in_file = parser_of("coordinator").parse_args(
        ["--config", str(path), "--state-dir", str(tmp_path), "--username", "c"]
    )
    assert from_args(in_file, {}).mqtt.password == "coordinator-secret"
    assert from_args(in_file, {"SKIPFLEET_MQTT_PASSWORD": "literal"}).mqtt.password == "literal"


def test_the_agents_password_follows_the_precedence_a_file_before_a_literal(tmp_path):
    from agent.config import from_args

    (tmp_path / "file-pw").write_text("from-config-file\n")
    (tmp_path / "env-pw").write_text("from-env-file\n")
    path = write(tmp_path, f'[agent]\npassword_file = "{tmp_path / "file-pw"}"\n')
    parse = parser_of("agent").parse_args
    base = ["--config", str(path), "--username", "pi-1", *REQUIRED]
    assert from_args(parse(base), {}).mqtt.password == "from-config-file"
    # the environment's literal password beats the config file's password file
    assert from_args(parse(base), {"SKIPFLEET_MQTT_PASSWORD": "env"}).mqtt.password == "env"
    # within one source, a file before a literal
    env_file = str(tmp_path / "env-pw")
    environ = {"SKIPFLEET_MQTT_PASSWORD": "env", "SKIPFLEET_MQTT_PASSWORD_FILE": env_file}
    assert from_args(parse(base), environ).mqtt.password == "from-env-file"
    # the command line before the environment
    assert from_args(parse([*base, "--password", "flag"]), environ).mqtt.password == "flag"


def test_config_show_prints_every_value_with_where_it_came_from(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, '[coordinator]\napi_port = 9001\nmax_temperature = "off"\n')
    monkeypatch.setenv("SKIPFLEET_BROKER", "mqtt://env-broker:1883")
    code = main(["config", "show", "--config", str(path), "coordinator", "--metrics-port", "9465"])
    assert code == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line[0].isalpha()}
    assert lines["api_port"].endswith(f"# file:{path}") and "= 9001" in lines["api_port"]
    temperature = lines["max_temperature"]
    assert temperature.endswith(f"# file:{path}") and '"off"' in temperature
    assert lines["metrics_port"].endswith("# flag") and "= 9465" in lines["metrics_port"]
    assert lines["broker"].endswith("# env:SKIPFLEET_BROKER") and "env-broker" in lines["broker"]
    assert lines["epochs"].endswith("# default") and "= 30" in lines["epochs"]
    # The output is a config file: read back, it gives the same values.
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    args = parser_of("coordinator").parse_args(["--config", str(shown)])
    again = resolve(args, {})
    assert again.values["api_port"] == 9001 and again.values["metrics_port"] == 9465
    assert again.values["max_temperature"] is None and again.values["epochs"] == 30
    assert again.values["broker"] == "mqtt://env-broker:1883"


def test_config_show_hides_secrets_and_shows_all_three_commands(monkeypatch, capsys):
    monkeypatch.setenv("SKIPFLEET_MQTT_PASSWORD", "do-not-print-me")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "do-not-print-me" not in out and "# password = <hidden>" in out
    assert all(f"[{section}]" in out for section in SECTIONS)


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        ("agent", "[agent]\nheartbeat-seconds = 5\n",
         "[agent] heartbeat-seconds: unknown key (did you mean 'heartbeat_seconds'?)"),
        ("coordinator", "[coordinator]\napi_port = \"8080\"\n",
         '[coordinator] api_port = "8080": expected an integer, got a string'),
        ("coordinator", "[coordinator]\nmax_temperature = true\n",
         "[coordinator] max_temperature = true: expected a number or 'off', got a boolean"),
        ("agent", "[agent]\nmqtt_version = \"4\"\n",
         "[agent] mqtt_version = \"4\": expected one of '5', '3.1.1'"),
        ("simulate", "[simulate]\ndevices = 2.5\n",
         "[simulate] devices = 2.5: expected an integer, got a float"),
        ("agent", "[agents]\ncohort = \"x\"\n", "unknown table or key 'agents' at the top level"),
        ("agent", "[agent]\npassword = \"x\"\n", "[agent] password: a secret is never read"),
        ("agent", "[agent\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_file_exits_2_naming_the_file_the_key_and_the_expected_type(
    tmp_path, capsys, command, text, message
):
    path = write(tmp_path, text)
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}: {message}" in err, err


def test_a_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["config", "show", "--config", str(tmp_path / "absent.toml"), "agent"]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_the_example_config_file_configures_every_command(tmp_path):
    from agent.config import from_args as agent_config
    from coordinator.config import from_args as coordinator_config

    example = tomllib.loads(EXAMPLE.read_text())
    assert set(example) == set(SECTIONS)
    for section in SECTIONS:  # every key of the example is read, none is left at its default
        resolved = resolve(parser_of(section).parse_args(["--config", str(EXAMPLE)]), {})
        from_file = {k for k, source in resolved.sources.items() if source.startswith("file:")}
        assert from_file == set(example[section])
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "ca.crt").write_text("not read here\n")
    # the paths of a real device, overridden by flags as a test machine needs
    here = ["--config", str(EXAMPLE), "--password-file", str(tmp_path / "pw"),
            "--tls-ca", str(tmp_path / "ca.crt")]  # fmt: skip
    coordinator = coordinator_config(parser_of("coordinator").parse_args(here), {})
    assert coordinator.mqtt.url.startswith("mqtts://broker.lan") and coordinator.api_port == 8080
    assert coordinator.policy.drift_threshold is None and coordinator.federation.steps == 50
    agent = agent_config(parser_of("agent").parse_args(here), {})
    assert agent.device_id == "pi-kitchen" and agent.mqtt.username == "pi-kitchen"
    assert agent.base_model_path == Path("/opt/skipfleet/base.npz")


def test_every_option_of_every_configurable_command_has_help_that_shows_its_default():
    for command in (*SECTIONS, "config"):
        parser = parser_of(command)
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = action.option_strings or action.dest
            assert action.help, f"skipfleet {command} {name}: no help text"
            if not action.option_strings and action.nargs is None:
                continue  # a required word (`config show`): no default to show
            shown = formatter._expand_help(action)
            assert "default" in shown, f"skipfleet {command} {name}: help shows no default"
    coordinator = " ".join(parser_of("coordinator").format_help().split())
    assert "(default: 9464)" in coordinator and "env SKIPFLEET_MQTT_PASSWORD_FILE" in coordinator


def test_a_simulated_fleet_does_not_inherit_the_operators_config_file(monkeypatch):
    monkeypatch.setenv(ENV_CONFIG, "/etc/skipfleet/skipfleet.toml")
    assert ENV_CONFIG not in child_env()


def test_the_pis_agent_toml_in_the_deploy_guide_is_a_valid_agent_table(tmp_path):
    guide = (REPO / "deploy" / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", guide, re.S)
    assert blocks, "deploy/README.md shows no agent.toml"
    path = write(tmp_path, textwrap.dedent(blocks[0]))
    resolved = resolve(parser_of("agent").parse_args(["--config", str(path)]), {})
    assert resolved.values["device_id"] == resolved.values["username"] == "pi-kitchen"
    assert resolved.sources["broker"] == f"file:{path}"


def test_the_config_file_code_needs_only_the_standard_library():
    """The agent loads it on a Pi: nothing beyond the standard library and `shared` itself."""
    script = (
        "import sys, shared.config_file\n"
        "top = {m.split('.')[0] for m in sys.modules if not m.startswith('_')}\n"
        "print(sorted(top - set(sys.stdlib_module_names) - {'shared'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]", result.stdout
