"""The compose broker as a local process: deploy/mosquitto/mosquitto.conf with its ACLs, the
container's ports and paths rewritten into a work dir, accounts made by
deploy/mosquitto/make-accounts.sh; and a small MQTT v5 client that waits for its acknowledgements.

The tests (tests/topology.py) and `skipfleet bench faults` run the broker exactly as compose does,
so what they find about identities and ACLs holds for the deployed broker.
"""

from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from skipfleet.brokers import MosquittoMissing, find_mosquitto, free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(:?-)([^}]*)\}")


class BrokerError(RuntimeError):
    """The compose broker could not be set up or did not start (the message says why)."""


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def compose_interpolate(value: object, environment: dict[str, str]) -> object:
    """value with compose's ${NAME:-default} / ${NAME-default} applied, as `docker compose` would
    (`:-` also replaces an empty value), so the processes run what the containers run."""
    if isinstance(value, dict):
        return {key: compose_interpolate(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(item, environment) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, default = match.groups()
        found = environment.get(name)
        if found is None or (operator == ":-" and not found):
            return default
        return found

    return _COMPOSE_VARIABLE.sub(substitute, value)


SERVICES = compose_interpolate(
    yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"], dict(os.environ)
)
MAKE_ACCOUNTS = DEPLOY / "mosquitto" / "make-accounts.sh"


def make_accounts(
    n: int,
    directory: Path,
    coordinators: Iterable[str] = (),
    partitions: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Run make-accounts.sh (with --coordinator NAME for each of `coordinators`, and
    --partitions P for each coordinator account `partitions` names: `coordinator` or
    `coordinator-NAME`); return the device and coordinator passwords by user name
    (`coordinator`, `coordinator-NAME`, a partition's `coordinator[-NAME]-pI`)."""
    if shutil.which("mosquitto_passwd") is None:
        raise BrokerError("mosquitto_passwd is not installed: run `make system-deps`")
    split = dict(partitions or {})

    def partitions_of(account: str) -> list[str]:
        return ["--partitions", str(split.pop(account))] if account in split else []

    options = partitions_of("coordinator")
    for name in coordinators:
        options += ["--coordinator", name, *partitions_of(f"coordinator-{name}")]
    if split:
        raise ValueError(f"partitions for accounts not made here: {sorted(split)}")
    result = subprocess.run(
        ["bash", str(MAKE_ACCOUNTS), *options, str(n), str(directory)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if result.returncode != 0:
        raise BrokerError(f"make-accounts.sh failed: {result.stderr}")
    lines = (directory / "device_passwords").read_text().splitlines()
    passwords = dict(line.split(":", 1) for line in lines)
    for path in directory.glob("coordinator*_password"):
        passwords[path.name.removesuffix("_password")] = path.read_text().strip()
    for path in directory.glob("coordinator*_password-p*"):
        account, index = path.name.rsplit("_password-p", 1)
        passwords[f"{account}-p{index}"] = path.read_text().strip()
    return passwords


class DeployBroker:
    """mosquitto running deploy/mosquitto/mosquitto.conf, its container paths mapped into `root`.

    Only ports, paths and logging change; the ACLs and every other setting are the compose
    broker's own. `passwd` is a mosquitto_passwd file, with the ACL `mosquitto_acl` beside it
    (make_accounts writes both). `extra_lines`
    (another listener, say) are appended; the broker must then also listen on `extra_ports`.
    """

    def __init__(self, root: Path, passwd: Path, extra_lines: Iterable[str] = (),
                 extra_ports: Iterable[int] = ()) -> None:  # fmt: skip
        binary = find_mosquitto()
        if binary is None:
            raise MosquittoMissing()
        self.root = root
        self.port, self.probe_port = free_port(), free_port()
        self.log_path = root / "mosquitto.log"
        # Container path -> host path, from the compose service itself.
        paths = {
            target: str(REPO / source)
            for source, target, *_ in (v.split(":") for v in SERVICES["mosquitto"]["volumes"])
            if source.startswith("./")
        }
        (root / "data").mkdir(parents=True)
        replacements = {
            "listener 1883": f"listener {self.port} 127.0.0.1",
            "listener 1880 127.0.0.1": f"listener {self.probe_port} 127.0.0.1",
            "persistence_location /mosquitto/data/": f"persistence_location {root / 'data'}/",
            "log_dest stdout": f"log_dest file {self.log_path}",
            "password_file /run/secrets/mosquitto_passwd": f"password_file {passwd}",
            "acl_file /run/secrets/mosquitto_acl": f"acl_file {passwd.parent / 'mosquitto_acl'}",
            "acl_file /mosquitto/config/probe.acl": (
                f"acl_file {paths['/mosquitto/config/probe.acl']}"
            ),
        }
        lines = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()
        for old, new in replacements.items():
            if lines.count(old) != 1:
                raise BrokerError(f"mosquitto.conf: expected one line {old!r}")
            lines[lines.index(old)] = new
        lines += extra_lines
        # As root, mosquitto would switch to user `mosquitto`, who cannot read the tmp dir.
        lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
        self._argv = [binary, "-c", str(root / "mosquitto.conf")]
        (root / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self._ports = [self.port, self.probe_port, *extra_ports]
        self.start()

    def start(self) -> None:
        """Run mosquitto (again, after kill(): the same ports, config and persistence)."""
        self.process = subprocess.Popen(
            self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while not all(listening(port) for port in self._ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise BrokerError(f"mosquitto did not start: {self.process.stderr.read()!r} "
                                  f"{self.log()[-2000:]}")  # fmt: skip
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stderr.close()

    def kill(self) -> None:
        """SIGKILL: no persistence snapshot is written, as in a power cut."""
        self.process.kill()
        self.process.wait(timeout=10)
        self.process.stderr.close()


class Mqtt:
    """A paho-mqtt 2.x MQTTv5 client that waits for its acknowledgements."""

    def __init__(self, port: int, client_id: str, username: str | None, password: str | None):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue = queue.Queue()
        self.acks: dict[int, object] = {}
        self.connack = None
        self.session_present = False
        self.disconnects: list[object] = []  # reason codes, e.g. a session taken over
        self.done = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, flags, reason, props: self.disconnects.append(
            reason
        )
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_ack
        self.client.on_message = lambda client, userdata, msg: self.messages.put(msg)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.done:
            self.connack = reason_code
            self.session_present = flags.session_present
            self.done.notify_all()

    def _on_ack(self, client, userdata, mid, reason_codes, properties):
        with self.done:
            self.acks[mid] = reason_codes
            self.done.notify_all()

    def _wait(self, ready) -> object:
        with self.done:
            if not self.done.wait_for(ready, timeout=5):
                raise BrokerError("no answer from the broker in 5 s")

    def connect(self, session_expiry_s: int = 0):
        """A clean start, or (session_expiry_s > 0) resuming a persistent session."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.connack = None
        self.client.connect(
            "127.0.0.1", self.port, clean_start=session_expiry_s == 0, properties=props
        )
        self.client.loop_start()
        self._wait(lambda: self.connack is not None)
        return self.connack

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.acks)
        return self.acks[info.mid]

    def subscribe(self, topic: str):
        _, mid = self.client.subscribe(topic, qos=1)
        self._wait(lambda: mid in self.acks)
        (reason,) = self.acks[mid]
        return reason

    def received(self, timeout: float, count: int | None = None) -> list:
        """Messages that arrive within `timeout` seconds (or until `count` have)."""
        out, deadline = [], time.monotonic() + timeout
        while len(out) != count and (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()
