"""Brokers skipfleet starts itself: a private mosquitto (tests, benchmarks, `simulate`).

skipfleet ships no broker of its own: without mosquitto installed, `MosquittoMissing` says how to
install it (docs/benchmarks.md, "The broker": why not a Python broker instead).

A `MosquittoBroker` has its own port, config, persistence and log in a work dir; it never
touches a broker on 1883. `stop()` is a graceful SIGTERM (mosquitto saves its
persistence snapshot), `kill()` a SIGKILL (it does not), and `start()` again reuses the same
port so clients can reconnect to "the same broker" in restart tests.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

INSTALL_MOSQUITTO = (
    "mosquitto is not installed, and skipfleet needs an MQTT broker: install it (on Debian or "
    "Ubuntu `sudo apt-get install mosquitto`; `make run` does that itself when run as root; "
    "elsewhere your system's mosquitto package), or pass --broker mqtt://HOST:PORT of a broker "
    "you run"
)


class MosquittoMissing(RuntimeError):
    """No mosquitto binary on this machine (the message says how to install one)."""

    def __init__(self) -> None:
        super().__init__(INSTALL_MOSQUITTO)


def find_mosquitto() -> str | None:
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


# Ports for the servers skipfleet starts (a broker, the coordinator's API and /metrics) are
# taken below the kernel's range for connections' own ports: bind(0) picks one in that range,
# which between this check and the server's own bind any outgoing connection may take (10,000
# simulated devices make as many; it happened once: "Address already in use"). And above Ray's
# range for its workers' ports (10002-19999 by default), which a node refuses to overlap with
# the ports it is given (skipfleet.ray_nodes: "a port number ... used by other components").
PORT_FLOOR = 20_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_TRIES = 200
_PORTS = random.SystemRandom()  # not the module's generator, which a caller may have seeded
# Ports this process handed out: two asked for in a row (a coordinator's API and /metrics) are
# both free until the first is bound, and must not be the same one
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing uses now, outside the range connections take theirs
    from (where that range is known and leaves room below it; else any free one)."""
    low = _ephemeral_low()
    if low is not None and low > PORT_FLOOR + PORT_TRIES:
        for _ in range(PORT_TRIES):
            port = _PORTS.randrange(PORT_FLOOR, low)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int | None:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class MosquittoBroker:
    def __init__(
        self, workdir: Path, *, port: int | None = None, extra_config: Sequence[str] = ()
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise MosquittoMissing()
        self.binary = binary
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_config = list(extra_config)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",  # the default snapshot every 30 min loses everything on SIGKILL
            # the coordinator acknowledges after its commit: the broker holds a burst meanwhile
            "max_queued_messages 100000",
            # QoS 1 messages a client may have in flight to the broker (its Receive Maximum) and
            # the broker to a client: the default 20 paced a round's 1,000 jobs by PUBACKs
            "max_inflight_messages 1000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # As root mosquitto would switch to user `mosquitto`, who cannot write the tmp dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            raise RuntimeError("broker already running")
        self._write_config()
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_until_listening(timeout_s)

    def _wait_until_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited early: {self._diagnostics()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"mosquitto did not listen on {self.port}: {self._diagnostics()}")

    def _diagnostics(self) -> str:
        stderr = ""
        if self._process is not None and self._process.poll() is not None:
            stderr = self._process.stderr.read().decode(errors="replace")
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"stderr={stderr[-2000:]!r} log={log[-2000:]!r}"

    def _end(self, sig: signal.Signals, timeout_s: float) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(sig)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stderr.close()
        self._process = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful: SIGTERM, mosquitto writes its persistence snapshot and exits."""
        self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """A crash: SIGKILL, whatever was not autosaved is lost."""
        self._end(signal.SIGKILL, 5.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
