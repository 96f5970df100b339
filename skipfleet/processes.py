"""Agents as child processes: what simulate, the benchmarks and the tests run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from shared.config_file import ENV_CONFIG

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: one BLAS thread, and this source tree importable. Not the
    operator's config file: a simulated fleet's agents and coordinator are configured by their
    flags alone, so a file written for real devices cannot leak into them."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop(ENV_CONFIG, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class AgentProcess:
    """`skipfleet agent` in a child process, its output in a log file."""

    def __init__(self, device_id: str, broker_url: str, data: Path, base_model: Path,
                 state_dir: Path, log_path: Path, extra: tuple[str, ...] = ()):  # fmt: skip
        self.device_id = device_id
        self.state_dir = state_dir
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "skipfleet.cli", "agent", "--device-id", device_id,
            "--broker", broker_url, "--data", str(data), "--base-model", str(base_model),
            "--state-dir", str(state_dir), *extra,
        ]  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, env=child_env(), stdout=self._log,
                                        stderr=subprocess.STDOUT)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]
