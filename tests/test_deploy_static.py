"""The deployable files, checked without a Docker engine: docker-compose.yml, the Dockerfiles and
.dockerignore, the scripts, the systemd unit, Prometheus and Mosquitto configuration.

The shell scripts run for real (with a fake `skipfleet` on PATH), and so does mosquitto: the
compose broker's own mosquitto.conf and ACL, rewritten only for ports and paths, must let a device
publish under its own id and refuse it under another's.
"""

from __future__ import annotations

import argparse
import configparser
import http.server
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from coordinator import cli as coordinator_cli
from coordinator.partition_accounts import partition_password_file, partition_username
from tests.topology import DeployBroker, Mqtt, make_accounts

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
MAKE_ACCOUNTS = DEPLOY / "mosquitto" / "make-accounts.sh"
ENTRYPOINT = DEPLOY / "agent-entrypoint.sh"
HEALTHCHECK = DEPLOY / "agent-healthcheck.sh"
SHELL_SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
DOCKERFILES = {
    "agent": DEPLOY / "agent.Dockerfile",
    "coordinator": DEPLOY / "coordinator.Dockerfile",
}
# The third-party services' images: upstream by default, a Debian stand-in where no registry
# answers (deploy/build-images.sh), run as the user named here.
WRAPPERS = {
    "mosquitto": (DEPLOY / "mosquitto.Dockerfile", "MOSQUITTO_IMAGE", "eclipse-mosquitto:2"),
    "prometheus": (DEPLOY / "prometheus.Dockerfile", "PROMETHEUS_IMAGE", "prom/prometheus:v2.53.2"),
}
STANDINS = DEPLOY / "standins"
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3}
MIB = 1024**2


def size_bytes(text: str | int) -> int:
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", str(text).strip().lower())
    assert match and match[2] in SIZE_UNITS, f"cannot read size {text!r}"
    return int(match[1]) * SIZE_UNITS[match[2]]


def command_flags(command: list[str]) -> dict[str, str]:
    """`--name=value` items of a compose command list."""
    return dict(item[2:].split("=", 1) for item in command if item.startswith("--") and "=" in item)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, **kwargs)


# -- docker-compose.yml ---------------------------------------------------------------------------
def test_compose_has_the_five_services():
    assert set(SERVICES) == {"mosquitto", "coordinator", "agent", "prometheus", "grafana"}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(name):
    check = SERVICES[name]["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
    for key in ("interval", "timeout", "retries"):
        assert key in check, f"{name}: healthcheck without {key}"


def test_dependencies_wait_until_healthy():
    expected = {
        "coordinator": {"mosquitto"},
        "agent": {"mosquitto", "coordinator"},
        "grafana": {"prometheus"},
    }
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert set(depends) == expected.get(name, set()), name
        for dependency, spec in depends.items():
            assert spec == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in SERVICES[dependency]


def test_agent_service_scales():
    agent = SERVICES["agent"]
    # Fixed names or host ports would collide between replicas; a fixed hostname would make every
    # replica the same device.
    for key in ("container_name", "ports", "hostname"):
        assert key not in agent, key
    replicas = agent["deploy"]["replicas"]
    assert isinstance(replicas, int) and replicas >= 1


def test_only_the_agent_is_built_without_extras_and_the_coordinator_with_them():
    for name, dockerfile in DOCKERFILES.items():
        build = SERVICES[name]["build"]
        assert build["context"] == "."
        assert REPO / build["dockerfile"] == dockerfile and dockerfile.is_file()
        assert "container_name" not in SERVICES[name]


def test_third_party_images_are_pinned_and_run_as_their_own_non_root_user():
    upstream = [SERVICES["grafana"]["image"]]
    for name, (dockerfile, arg, image) in WRAPPERS.items():
        assert SERVICES[name]["build"] == {
            "context": ".",
            "dockerfile": f"deploy/{dockerfile.name}",
        }
        assert SERVICES[name]["image"] == f"skipfleet-{name}:${{SKIPFLEET_TAG:-dev}}"
        instructions = dockerfile_instructions(dockerfile)
        assert instructions[0] == ("ARG", f"{arg}={image}")
        assert ("FROM", f"${{{arg}}}") in instructions
        (user,) = [rest for keyword, rest in instructions if keyword == "USER"]
        assert user.split(":")[0] not in ("root", "0"), name
        upstream.append(image)
    for image in upstream:
        assert ":" in image and not image.endswith(":latest"), image


def test_the_stand_ins_give_the_wrappers_their_users():
    # Eclipse's image runs mosquitto as uid 1883, prom/prometheus as nobody (65534).
    mosquitto = (STANDINS / "mosquitto.Dockerfile").read_text()
    assert "--gid 1883 mosquitto" in mosquitto and "--uid 1883" in mosquitto
    assert "install -d -o mosquitto -g mosquitto /mosquitto/config /mosquitto/data" in mosquitto
    assert (
        "install -d -o nobody -g nogroup /prometheus"
        in (STANDINS / "prometheus.Dockerfile").read_text()
    )
    assert ("USER", "1883:1883") in dockerfile_instructions(WRAPPERS["mosquitto"][0])
    assert ("USER", "65534:65534") in dockerfile_instructions(WRAPPERS["prometheus"][0])


def test_grafana_alone_is_behind_the_dashboards_profile():
    assert SERVICES["grafana"]["profiles"] == ["dashboards"]
    assert [name for name, s in SERVICES.items() if "profiles" in s] == ["grafana"]


def test_compose_file_is_read_by_both_compose_versions_without_the_fleet_variables(tmp_path):
    # docker-compose 1.29 refuses a top-level `name:`; .env names the project for both.
    assert "name" not in COMPOSE
    assert "COMPOSE_PROJECT_NAME=skipfleet\n" in (REPO / ".env").read_text()
    commands = (
        [["docker", "compose"]] if run(["docker", "compose", "version"]).returncode == 0 else []
    )
    if shutil.which("docker-compose"):
        commands.append(["docker-compose"])
    if not commands:
        pytest.fail(
            "neither `docker compose` nor `docker-compose` is installed: `make system-deps`"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKIPFLEET_", "COMPOSE_"))}
    for command in commands:
        result = run([*command, "config", "-q"], cwd=REPO, env=env)
        assert result.returncode == 0, (command, result.stderr)


def test_coordinator_has_shared_memory_for_ray():
    coordinator = SERVICES["coordinator"]
    shm = size_bytes(coordinator["shm_size"])
    assert shm >= 256 * MIB  # Docker's default 64 MB is below Ray's minimum object store
    store = int(coordinator["environment"]["SKIPFLEET_RAY_OBJECT_STORE_BYTES"])
    assert 75 * MIB <= store < shm
    assert coordinator["init"] is True  # tini reaps Ray's processes and forwards SIGTERM
    assert "ray start --head" in (DEPLOY / "coordinator-entrypoint.sh").read_text()
    assert command_flags(coordinator["command"])["ray-address"] == "auto"


def test_secrets_come_from_compose_secrets_not_the_environment():
    declared = COMPOSE["secrets"]
    for name, spec in declared.items():
        assert spec["file"] == f"./deploy/secrets/{name}", name
    used = set()
    for name, service in SERVICES.items():
        assert "env_file" not in service, name
        granted = set(service.get("secrets", []))
        assert granted <= set(declared), name
        used |= granted
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert key.endswith("FILE") and str(value).startswith("/run/secrets/"), key
        # Every /run/secrets/X a service refers to must be granted to it.
        text = json.dumps(service)
        for secret in re.findall(r"/run/secrets/(\w+)", text):
            assert secret in granted, (name, secret)
    assert used == set(declared)
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    for setting in ("password_file", "acl_file"):
        (secret,) = re.findall(rf"^{setting} /run/secrets/(\w+)$", conf, re.M)
        assert secret in SERVICES["mosquitto"]["secrets"], setting


def test_make_accounts_writes_exactly_the_compose_secrets(tmp_path):
    secrets = tmp_path / "secrets"
    passwords = make_accounts(2, secrets)
    assert {p.name for p in secrets.iterdir()} == set(COMPOSE["secrets"])
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path.name
    hashed = dict(line.split(":", 1) for line in (secrets / "mosquitto_passwd").read_text().split())
    assert set(hashed) == {"device-0", "device-1", "coordinator"}
    assert all(value.startswith("$7$") for value in hashed.values())  # PBKDF2-SHA512
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", pw) for pw in passwords.values())
    # Growing the fleet keeps every existing password.
    grown = make_accounts(3, secrets)
    assert {k: grown[k] for k in passwords} == passwords and "device-2" in grown
    assert run(["bash", str(MAKE_ACCOUNTS), "0", str(secrets)]).returncode == 64


def test_make_accounts_gives_each_coordinator_instance_its_own_account_and_acl_block(tmp_path):
    secrets = tmp_path / "secrets"
    first = make_accounts(2, secrets, coordinators=["east"])
    assert {"coordinator", "coordinator-east"} <= set(first)
    mounted = (secrets / "mosquitto_acl").stat().st_ino
    grown = make_accounts(2, secrets, coordinators=["west"])  # east is kept, not asked again
    assert {k: grown[k] for k in first} == first and "coordinator-west" in grown
    hashed = (secrets / "mosquitto_passwd").read_text().split()
    assert {line.split(":")[0] for line in hashed} == {
        "device-0", "device-1", "coordinator", "coordinator-east", "coordinator-west"
    }  # fmt: skip
    # Each coordinator account has exactly the template coordinator's grants, and nothing else
    # of the template changes: mosquitto has no wildcard for user names.
    template, made = acl_rules(MOSQUITTO_DIR / "acl"), acl_rules(secrets / "mosquitto_acl")
    assert made == template | {
        "coordinator-east": template["coordinator"],
        "coordinator-west": template["coordinator"],
    }
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o444, path.name
    # rewritten in place: compose's bind mount of the file sees the new ACL after a SIGHUP
    assert (secrets / "mosquitto_acl").stat().st_ino == mounted
    bad = run(["bash", str(MAKE_ACCOUNTS), "--coordinator", "East!", "2", str(secrets)])
    assert bad.returncode == 64 and "--instance" in bad.stderr


def test_make_accounts_gives_each_partition_its_own_account_file_and_acl_block(tmp_path):
    secrets = tmp_path / "secrets"
    first = make_accounts(1, secrets, coordinators=["east"],
                          partitions={"coordinator": 2, "coordinator-east": 3})  # fmt: skip
    made = {"coordinator-p0", "coordinator-p1"} | {f"coordinator-east-p{i}" for i in range(3)}
    assert made <= set(first)
    # the coordinator's --password-file with -pI appended: coordinator/partition_accounts.py
    for index in range(3):
        path = secrets / f"coordinator-east_password-p{index}"
        assert path.read_text().strip() == first[f"coordinator-east-p{index}"]
        assert path == partition_password_file(secrets / "coordinator-east_password", index)
        assert partition_username("coordinator-east", index) == f"coordinator-east-p{index}"
    assert len({first[a] for a in made}) == len(made)  # a password each
    hashed = (secrets / "mosquitto_passwd").read_text().split()
    assert {line.split(":")[0] for line in hashed} == {
        "device-0", "coordinator", "coordinator-east"
    } | made  # fmt: skip
    template = acl_rules(MOSQUITTO_DIR / "acl")
    assert acl_rules(secrets / "mosquitto_acl") == template | {
        account: template["coordinator"] for account in made | {"coordinator-east"}
    }
    # a later run without --partitions keeps the partition accounts and their passwords
    again = make_accounts(1, secrets)
    assert {k: again[k] for k in first} == first
    for argv in (["--partitions", "0"], ["--partitions", "65"], ["--coordinator", "east-p1"]):
        bad = run(["bash", str(MAKE_ACCOUNTS), *argv, "1", str(secrets)])
        assert bad.returncode == 64 and argv[0] in bad.stderr, argv


def test_state_lives_in_named_volumes():
    declared = set(COMPOSE["volumes"])
    used = set()
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), (name, source)
            elif not source.startswith("$"):
                used.add(source)
    assert used == declared
    assert "coordinator-state:/var/lib/skipfleet" in SERVICES["coordinator"]["volumes"]
    assert "agent-state:/var/lib/skipfleet" in SERVICES["agent"]["volumes"]
    assert any(v.endswith(":/data/fleet:ro") for v in SERVICES["agent"]["volumes"])


def test_agent_environment_is_read_by_someone():
    readers = ENTRYPOINT.read_text() + HEALTHCHECK.read_text()
    readers += (REPO / "agent" / "config.py").read_text()
    for key in SERVICES["agent"]["environment"]:
        assert key in readers, f"{key} is set for the agent but read by nothing"


def test_prometheus_scrapes_the_coordinator_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    coordinator = SERVICES["coordinator"]
    port = command_flags(coordinator["command"])["metrics-port"]
    assert targets == [f"coordinator:{port}"]
    assert port in coordinator["expose"]
    assert command_flags(coordinator["command"])["metrics-addr"] == "0.0.0.0"
    mounts = dict(v.split(":")[:2] for v in SERVICES["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_compose_prometheus_loads_the_alert_rules_beside_its_config():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in SERVICES["prometheus"]["volumes"])
    in_container = {Path(target): Path(source) for source, target in mounts.items()}
    config_dir = Path("/etc/prometheus")  # the --config.file's directory: rule paths start there
    assert config["rule_files"], "no rule files"
    for rule_file in config["rule_files"]:
        source = in_container.get(config_dir / rule_file)
        assert source is not None, f"{rule_file} is not mounted in {config_dir}"
        assert (REPO / source).resolve() == (DEPLOY / "prometheus" / rule_file).resolve()


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    result = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_coordinator_command_matches_its_cli():
    parser = argparse.ArgumentParser()
    coordinator_cli.configure(parser)
    parser.parse_args(SERVICES["coordinator"]["command"])


# -- images ------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def copy_sources(path: Path) -> list[str]:
    """Build-context sources of every COPY without --from."""
    sources = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        if any(word.startswith("--from=") for word in words):
            continue
        sources += [word for word in words if not word.startswith("--")][:-1]
    return sources


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_slim_and_non_root(name):
    instructions = dockerfile_instructions(DOCKERFILES[name])
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    assert froms[0].endswith(" AS build")
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in instructions
    stage = final_stage(DOCKERFILES[name])
    assert any(k == "COPY" and "--from=build" in rest for k, rest in stage)
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert f"deploy/{entrypoint[0]}" in copy_sources(DOCKERFILES[name])


def pip_steps(name: str) -> list[str]:
    """The build's pip-in-build.sh calls, each checked to get pip's cache and the host's index
    settings as mounts only (BuildKit cache and secrets), never as a layer."""
    steps = []
    for keyword, rest in dockerfile_instructions(DOCKERFILES[name]):
        if keyword == "RUN" and "pip-in-build.sh" in rest:
            for mount in ("type=cache,id=skipfleet-pip,target=/root/.cache/pip",
                          "type=secret,id=pip_cert", "type=secret,id=pip_conf"):  # fmt: skip
                assert f"--mount={mount}" in rest, (name, rest)
            steps.append(rest.split("pip-in-build.sh", 1)[1].strip())
        assert not (keyword in ("ENV", "ARG") and "PIP_" in rest), (name, keyword, rest)
    return steps


def test_agent_image_installs_the_package_without_extras_and_never_ray():
    instructions = dockerfile_instructions(DOCKERFILES["agent"])
    assert pip_steps("agent") == [
        'dependencies "" --only-binary=numpy,msgpack,paho-mqtt',
        "package",
    ]
    for keyword, rest in instructions:
        assert not re.search(r"\bray\b|\[coordinator\]|prometheus", rest, re.I), (keyword, rest)
    assert not any(
        source.startswith("coordinator") for source in copy_sources(DOCKERFILES["agent"])
    )
    # `pip install .` pulls the base dependencies only: they must stay Pi-sized.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in project["dependencies"]}
    assert names == {"numpy", "paho-mqtt", "msgpack"}


def test_coordinator_image_installs_the_coordinator_extra():
    assert pip_steps("coordinator") == [
        "dependencies coordinator --only-binary=ray,numpy,grpcio",
        "package",
    ]


def test_dependencies_are_installed_before_the_code_is_copied():
    # A change to the code must not reinstall NumPy or Ray: the dependency layer sees only
    # pyproject.toml.
    for name, dockerfile in DOCKERFILES.items():
        instructions = dockerfile_instructions(dockerfile)
        steps = [rest for keyword, rest in instructions if keyword in ("COPY", "RUN")]
        dependencies = next(i for i, s in enumerate(steps) if "pip-in-build.sh dependencies" in s)
        copied = [s for s in steps[:dependencies] if not s.startswith("--mount")]
        assert copied[-1] == "pyproject.toml ./", (name, copied)
        assert not any(s.startswith(("shared/", "agent/", "README.md")) for s in copied), name


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent dirs decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*"
            if tok == "**"
            else "[^/]*"
            if tok == "*"
            else "[^/]"
            if tok == "?"
            else re.escape(tok)
            for tok in re.findall(r"\*\*|\*|\?|[^*?]+", body)
        )
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_what_the_images_copy_and_nothing_secret():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES.values():
        for source in copy_sources(dockerfile):
            path = REPO / source
            assert path.exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py") if p.is_file()]
            assert files, source
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if "__pycache__" not in relative:
                    assert not dockerignore_excludes(relative, patterns), relative
    for private in (
        "deploy/secrets/device_passwords",
        ".venv/bin/python",
        ".git/config",
        "tests/test_topics.py",
        "agent/__pycache__/config.cpython-311.pyc",
        "docker-compose.yml",
    ):
        assert dockerignore_excludes(private, patterns), private


# -- scripts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses_and_is_strict(script):
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.fixture
def fake_agent(tmp_path):
    """A tmp tree for the entrypoint: 3 shards and a `skipfleet` that prints its arguments."""
    (tmp_path / "shards").mkdir()
    for k in range(3):
        (tmp_path / "shards" / f"shard-{k}.npz").write_bytes(b"")
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "skipfleet"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "run").mkdir()
    return tmp_path


def run_entrypoint(root: Path, hostname: str, passwords: dict[str, str], **env: str):
    lines = "".join(f"{user}:{password}\n" for user, password in passwords.items())
    (root / "device_passwords").write_text(lines)
    environment = {
        "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
        "HOME": str(root),
        "HOSTNAME": hostname,
        "SKIPFLEET_SHARDS_DIR": str(root / "shards"),
        "SKIPFLEET_BASE_MODEL": str(root / "base.npz"),
        "SKIPFLEET_STATE_ROOT": str(root / "state"),
        "SKIPFLEET_RUNTIME_DIR": str(root / "run"),
        "SKIPFLEET_DEVICE_PASSWORDS_FILE": str(root / "device_passwords"),
        **env,
    }
    return run(["bash", str(ENTRYPOINT), "--heartbeat-seconds", "10"], env=environment)


def agent_args(stdout: str) -> argparse.Namespace:
    """What the entrypoint passed to `skipfleet agent`, parsed by the agent's own CLI."""
    from agent.config import add_arguments

    words = stdout.splitlines()
    assert words[0] == "agent"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(words[1:])


@pytest.mark.parametrize(
    ("hostname", "device_id", "shard"),
    [
        ("skipfleet-agent-1", "device-0", 0),  # compose v2: <project>-<service>-<n>, n from 1
        ("skipfleet-agent-3", "device-2", 2),
        ("skipfleet_agent_12", "device-11", 2),  # compose v1 names; 11 mod 3 shards
        ("otherproject-agent-05", "device-4", 1),
        ("skipfleet-agent-run-3b2c1d", "skipfleet-agent-run-3b2c1d", None),  # compose run
        ("Pi-Kitchen_07", "pi-kitchen-07", None),
        ("Edge.Node.LOCAL", "edge-node-local", None),
        ("-weird--Host-", "weird--host", None),
        ("3f2a9c1b7d4e", "3f2a9c1b7d4e", None),  # a container id Docker's DNS does not know
        ("x" * 70, "x" * 64, None),
    ],
)
def test_entrypoint_derives_a_valid_device_id_from_the_hostname(
    fake_agent, hostname, device_id, shard
):
    passwords = {"device-0": "other", device_id: "s3cret-pw"}
    result = run_entrypoint(fake_agent, hostname, passwords)
    assert result.returncode == 0, result.stderr
    args = agent_args(result.stdout)
    assert re.fullmatch(r"[a-z0-9-]{1,64}", args.device_id)
    assert args.device_id == device_id and args.username == device_id
    assert args.state_dir == str(fake_agent / "state" / device_id)
    assert args.base_model == str(fake_agent / "base.npz")
    assert args.heartbeat_seconds == 10  # compose `command:` is passed on
    chosen = re.fullmatch(r".*/shard-(\d)\.npz", args.data)
    assert chosen and (fake_agent / "shards" / Path(args.data).name).is_file()
    if shard is not None:
        assert int(chosen[1]) == shard
    else:  # a checksum of the id: stable from one start to the next
        assert agent_args(run_entrypoint(fake_agent, hostname, passwords).stdout).data == args.data
    # The agent gets a file holding its own password only, readable by it alone.
    password_file = Path(args.password_file)
    assert password_file.read_text() == "s3cret-pw\n"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600


def test_entrypoint_honours_an_explicit_device_id_and_password_file(fake_agent):
    (fake_agent / "own-password").write_text("pw\n")
    result = run_entrypoint(
        fake_agent,
        "skipfleet-agent-3",
        {},
        SKIPFLEET_DEVICE_ID="pi-07",
        SKIPFLEET_MQTT_PASSWORD_FILE=str(fake_agent / "own-password"),
    )
    assert result.returncode == 0, result.stderr
    args = agent_args(result.stdout)
    assert (args.device_id, args.username) == ("pi-07", "pi-07")
    assert args.password_file == str(fake_agent / "own-password")


@pytest.mark.parametrize(
    ("hostname", "env", "message"),
    [
        ("___", {}, "no valid device id"),
        ("skipfleet-agent-1", {"SKIPFLEET_DEVICE_ID": "Pi_07"}, "no valid device id"),
        ("skipfleet-agent-9", {}, "no password for device-8"),
        ("skipfleet-agent-1", {"SKIPFLEET_SHARDS_DIR": "/nonexistent"}, "no shards"),
    ],
)
def test_entrypoint_refuses_what_cannot_work(fake_agent, hostname, env, message):
    result = run_entrypoint(fake_agent, hostname, {"device-0": "pw"}, **env)
    assert result.returncode == 64  # the agent's exit code for a bad configuration
    assert message in result.stderr
    assert result.stdout == ""  # the agent never started


def test_agent_healthcheck_wants_a_fresh_health_file(tmp_path):
    health = tmp_path / "health"
    env = {
        "PATH": os.environ["PATH"],
        "SKIPFLEET_HEALTH_FILE": str(health),
        "SKIPFLEET_HEALTH_MAX_AGE_SECONDS": "35",
    }
    assert run(["bash", str(HEALTHCHECK)], env=env).returncode == 1  # not written yet
    health.write_text("ok")
    assert run(["bash", str(HEALTHCHECK)], env=env).returncode == 0
    old = time.time() - 60
    os.utime(health, (old, old))
    assert run(["bash", str(HEALTHCHECK)], env=env).returncode == 1
    # The image sets the same file the compose healthcheck reads.
    assert "SKIPFLEET_HEALTH_FILE=/run/skipfleet/health" in DOCKERFILES["agent"].read_text()
    assert SERVICES["agent"]["healthcheck"]["test"] == ["CMD", "agent-healthcheck.sh"]
    assert "deploy/agent-healthcheck.sh" in copy_sources(DOCKERFILES["agent"])


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_coordinator_healthcheck_follows_the_health_endpoint(status):
    handler = type("Health", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd, python, *args = SERVICES["coordinator"]["healthcheck"]["test"]
        assert (cmd, python) == ("CMD", "python")
        args = [arg.replace(":8080/", f":{server.server_port}/") for arg in args]
        result = run([sys.executable, *args])
        assert (result.returncode == 0) == (status == 200)
    finally:
        server.shutdown()
        server.server_close()
    # On 127.0.0.1:8080 unless SKIPFLEET_API_PORT says otherwise (empty: a free port).
    assert SERVICES["coordinator"]["ports"] == ["127.0.0.1:${SKIPFLEET_API_PORT-8080}:8080"]
    assert command_flags(SERVICES["coordinator"]["command"])["api-port"] == "8080"


# -- systemd ---------------------------------------------------------------------------------
UNIT = DEPLOY / "systemd" / "skipfleet-agent.service"
BACKOFF = DEPLOY / "systemd" / "skipfleet-agent.service.d" / "backoff.conf"


def unit_file(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


def test_systemd_unit_parses_and_runs_as_an_unprivileged_user():
    unit = unit_file(UNIT)
    service = unit["Service"]
    assert service["User"] == "skipfleet"
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"]
    # The backoff keys (systemd >= 254) live in a drop-in, not in the unit bookworm verifies.
    assert dict(unit_file(BACKOFF)["Service"]) == {
        "RestartSteps": "10",
        "RestartMaxDelaySec": "10min",
    }
    assert "RestartSteps" not in service and "RestartMaxDelaySec" not in service
    assert service["LoadCredential"] == "mqtt-password:/etc/skipfleet/mqtt-password"
    assert service["StateDirectory"] == "skipfleet"
    # Settings come from a TOML config file, not a flag string in an environment file.
    assert "EnvironmentFile" not in service and "$" not in service["ExecStart"]
    assert service["RestartPreventExitStatus"].split() == ["2", "64"]
    assert service["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The options ExecStart passes exist in the agent's CLI; the password never appears inline.
    from agent.config import add_arguments

    binary, command, *options = service["ExecStart"].split()
    assert binary.endswith("/skipfleet") and command == "agent"
    assert "--password-file=%d/mqtt-password" in options
    assert "--config=/etc/skipfleet/agent.toml" in options
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.parse_args(options)


def test_systemd_unit_verifies_without_a_warning(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed: run `make system-deps`")
    # verify wants ExecStart's binary to exist: point it at one that does.
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/skipfleet/bin/skipfleet", "/bin/true"))
    result = run([analyze, "verify", str(copy)])
    assert result.returncode == 0 and result.stdout + result.stderr == "", result


# -- mosquitto ---------------------------------------------------------------------------------
MOSQUITTO_DIR = DEPLOY / "mosquitto"


def conf_sections(path: Path) -> list[list[str]]:
    """The config's lines split at each `listener` (the first section holds the globals)."""
    sections: list[list[str]] = [[]]
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("listener "):
            sections.append([])
        sections[-1].append(line)
    return sections


def test_mosquitto_conf_authenticates_devices_and_persists_often():
    general, devices, probe = conf_sections(MOSQUITTO_DIR / "mosquitto.conf")
    assert "per_listener_settings true" in general
    assert "persistence true" in general
    (autosave,) = [line for line in general if line.startswith("autosave_interval ")]
    assert int(autosave.split()[1]) <= 30  # the default 1800 s loses queued commands on a crash
    assert devices[0] == "listener 1883"
    assert "allow_anonymous false" in devices
    assert "password_file /run/secrets/mosquitto_passwd" in devices
    assert "acl_file /run/secrets/mosquitto_acl" in devices  # make-accounts.sh writes it
    # The anonymous probe listener is loopback only, with an ACL of its own, and not published.
    assert probe[0] == "listener 1880 127.0.0.1"
    assert "allow_anonymous true" in probe and "acl_file /mosquitto/config/probe.acl" in probe
    assert [p.split(":")[-1] for p in SERVICES["mosquitto"]["ports"]] == ["1883"]


def acl_rules(path: Path) -> dict[str | None, list[str]]:
    """ACL lines by user: None for `pattern` lines (every user), user names for `topic` lines."""
    rules: dict[str | None, list[str]] = {None: []}
    user = "<anonymous>"
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            user = line.split(None, 1)[1]
            rules.setdefault(user, [])
        elif line.startswith("pattern "):
            rules[None].append(line)
        else:
            rules.setdefault(user, []).append(line)
    return rules


def test_acl_confines_each_device_to_its_own_topics():
    from shared.topics import DEFAULT_ROOT, DOWNLINK, UPLINK

    rules = acl_rules(MOSQUITTO_DIR / "acl")
    expected = {f"pattern write {DEFAULT_ROOT}/%u/{kind.value}" for kind in UPLINK}
    assert all(kind.value.startswith("cmd/") for kind in DOWNLINK)
    expected.add(f"pattern read {DEFAULT_ROOT}/%u/cmd/#")
    assert set(rules[None]) == expected and len(rules[None]) == len(expected)
    assert rules["coordinator"] == ["topic read fleet/#", "topic write fleet/+/cmd/#"]
    assert "<anonymous>" not in rules  # no line before the first `user` grants anything to all
    assert set(rules) == {None, "coordinator"}
    assert acl_rules(MOSQUITTO_DIR / "probe.acl") == {
        None: [],
        "<anonymous>": ["topic read $SYS/broker/uptime"],
    }


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory):
    """mosquitto running deploy/mosquitto/mosquitto.conf, its container paths mapped to tmp."""
    root = tmp_path_factory.mktemp("fleet-broker")
    passwords = make_accounts(2, root / "secrets")
    broker = DeployBroker(root, root / "secrets" / "mosquitto_passwd")
    yield {"port": broker.port, "probe_port": broker.probe_port, "passwords": passwords}
    broker.stop()


@pytest.fixture
def clients(fleet_broker):
    opened = []

    def connect(user: str | None, *, password: str | None = None, port: int | None = None):
        secret = password if password is not None else fleet_broker["passwords"].get(user)
        client = Mqtt(port or fleet_broker["port"], f"{user or 'anon'}-{len(opened)}", user, secret)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.mark.slow
def test_broker_delivers_a_devices_own_report_and_refuses_another_devices(clients):
    coordinator, device0 = clients("coordinator"), clients("device-0")
    assert not coordinator.connect().is_failure
    assert not device0.connect().is_failure
    assert not coordinator.subscribe("fleet/+/report").is_failure

    ack = device0.publish("fleet/device-0/report", b"mine")
    assert not ack.is_failure
    assert [m.payload for m in coordinator.received(5.0, 1)] == [b"mine"]

    ack = device0.publish("fleet/device-1/report", b"forged")
    assert ack.is_failure and str(ack) == "Not authorized"
    assert coordinator.received(0.5) == []


@pytest.mark.slow
def test_broker_keeps_each_devices_commands_to_itself(clients):
    coordinator, device0, device1 = clients("coordinator"), clients("device-0"), clients("device-1")
    for client in (coordinator, device0, device1):
        assert not client.connect().is_failure
    assert not device0.subscribe("fleet/device-0/cmd/#").is_failure
    assert not device1.subscribe("fleet/device-1/cmd/#").is_failure
    # device-0 may not read device-1's commands. Mosquitto 2.0 grants the subscription itself and
    # applies the read ACL on delivery: nothing of device-1's ever reaches device-0.
    device0.subscribe("fleet/device-1/cmd/#")
    assert not coordinator.publish("fleet/device-1/cmd/job", b"job for 1").is_failure
    assert not coordinator.publish("fleet/device-0/cmd/job", b"job for 0").is_failure
    assert [m.payload for m in device1.received(5.0, 1)] == [b"job for 1"]
    assert [(m.topic, m.payload) for m in device0.received(0.5, 2)] == [
        ("fleet/device-0/cmd/job", b"job for 0")
    ]
    # Nobody forges the other side: devices send no commands, the coordinator sends no reports.
    assert str(device0.publish("fleet/device-0/cmd/job", b"x")) == "Not authorized"
    assert str(coordinator.publish("fleet/device-0/report", b"x")) == "Not authorized"


@pytest.mark.slow
def test_broker_refuses_bad_credentials(clients):
    assert clients("device-0", password="wrong").connect().is_failure
    assert clients(None).connect().is_failure  # anonymous, on the device listener


@pytest.mark.slow
def test_broker_healthcheck_uses_the_read_only_probe_listener(fleet_broker, clients):
    cmd, *probe = SERVICES["mosquitto"]["healthcheck"]["test"]
    assert cmd == "CMD"
    probe = [arg.replace("$$", "$") for arg in probe]  # compose's escape for a literal $
    probe[probe.index("-p") + 1] = str(fleet_broker["probe_port"])
    result = run(probe)
    assert result.returncode == 0, result.stderr
    anonymous = clients(None, port=fleet_broker["probe_port"])
    assert not anonymous.connect().is_failure
    assert str(anonymous.publish("fleet/device-0/report", b"x")) == "Not authorized"
