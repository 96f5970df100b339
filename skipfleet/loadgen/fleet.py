"""A simulated fleet: the load generator spread over several processes.

Devices are split evenly: process p runs ids `{prefix}-{first..last}` on its own asyncio loop,
with its own data file (its own reference fine-tune) when several are given. `start()` returns
once every process reported all its devices connected; `installs()` reads what the devices
report installing, with their own wall-clock times.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skipfleet.processes import child_env


@dataclass(frozen=True)
class Install:
    device: str
    version: int | None
    how: str
    at: float  # unix seconds, the device's clock (this machine's)


def split(devices: int, processes: int) -> list[tuple[int, int]]:
    """(first index, count) per process, as even as possible; no empty process."""
    processes = max(1, min(processes, devices))
    base, extra = divmod(devices, processes)
    out, first = [], 0
    for p in range(processes):
        count = base + (1 if p < extra else 0)
        out.append((first, count))
        first += count
    return out


class SimulatedFleet:
    def __init__(
        self,
        broker_url: str,
        base_model: Path,
        data_files: Sequence[Path],
        devices: int,
        processes: int,
        workdir: Path,
        *,
        options: Sequence[str] = (),
        cohorts: Sequence[str] | None = None,  # process p's devices: cohorts[p % len]
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._argv_common = [
            "--broker", broker_url, "--base-model", str(base_model), *options,
        ]  # fmt: skip
        self._data_files = list(data_files)
        self._cohorts = list(cohorts or [])
        self._shares = split(devices, processes)
        self._processes: list[subprocess.Popen] = []
        self._logs: list = []
        self.ready: list[dict] = []
        self._installs: list[Install] = []  # read so far, from each file up to its offset
        self._install_offsets: dict[int, int] = {}

    def _paths(self, p: int) -> tuple[Path, Path, Path]:
        return (
            self.workdir / f"ready-{p}.json",
            self.workdir / f"installs-{p}.jsonl",
            self.workdir / f"loadgen-{p}.log",
        )

    def start(self, timeout_s: float = 300.0) -> list[dict]:
        for p, (first, count) in enumerate(self._shares):
            ready, events, log_path = self._paths(p)
            data = self._data_files[p % len(self._data_files)]
            argv = [
                sys.executable, "-m", "skipfleet.loadgen", *self._argv_common,
                "--data", str(data), "--devices", str(count), "--first-index", str(first),
                "--ready-file", str(ready), "--events", str(events),
            ]  # fmt: skip
            if self._cohorts:
                argv += ["--cohort", self._cohorts[p % len(self._cohorts)]]
            log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
            self._logs.append(log)
            self._processes.append(
                subprocess.Popen(argv, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
            )
        self.ready = self._wait_ready(timeout_s)
        return self.ready

    def _wait_ready(self, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        paths = [self._paths(p)[0] for p in range(len(self._processes))]
        while not all(path.exists() for path in paths):
            for p, process in enumerate(self._processes):
                if process.poll() is not None:
                    raise RuntimeError(f"load generator {p} exited: {self.log_tail(p)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load generators not ready in {timeout_s:.0f} s")
            time.sleep(0.1)
        return [json.loads(path.read_text()) for path in paths]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    @property
    def device_ids(self) -> list[str]:
        return [device for ready in self.ready for device in ready["devices"]]

    def installs(self) -> list[Install]:
        """Every install the processes logged so far. Each call reads only what the files
        gained since the last one (the benchmark asks 4 times a second; parsing every line each
        time took it 4-8 CPU-s a 10,000-device round, on the cores the coordinator runs on)."""
        for p in range(len(self._shares)):
            self._installs.extend(self._new_installs(p))
        return list(self._installs)

    def _new_installs(self, p: int) -> list[Install]:
        path = self._paths(p)[1]
        if not path.exists():
            return []
        with path.open("rb") as source:
            source.seek(self._install_offsets.get(p, 0))
            data = source.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written: next time
        self._install_offsets[p] = self._install_offsets.get(p, 0) + len(complete)
        lines = complete.decode().splitlines()
        return [Install(**json.loads(line)) for line in lines if line.endswith("}")]

    def first_installs(self, version: int, since: float) -> dict[str, float]:
        """When each device first ran `version` at or after `since` (unix seconds)."""
        first: dict[str, float] = {}
        for install in self.installs():
            if install.version == version and install.at >= since:
                first[install.device] = min(install.at, first.get(install.device, install.at))
        return first

    def log_tail(self, p: int, chars: int = 2000) -> str:
        path = self._paths(p)[2]
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
