"""The process-based fleet: one `skipfleet agent` child per device, each behind its own proxy.

Every agent connects to the broker THROUGH its own `TcpProxy` port, so its network can be cut
(`cut`/`restore`) independently of the process itself (`kill`, `pause`/`resume`, `restart`).
The run dir holds one folder per device (`devices/{id}/state`: the agent's state dir, which
survives restarts and scaling down; `devices/{id}/agent-{boot}.log`: one log per start) and
`fleet.json` (skipfleet.fleet.runstate), rewritten atomically whenever something changes.

Thread-safe: the control endpoint calls in from its request threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from skipfleet.fleet.base import (
    CutMode,
    DeviceInfo,
    DeviceState,
    DeviceStateError,
    FleetUnavailable,
    InvalidRequest,
    UnknownDevice,
    Unsupported,
    check_count,
)
from skipfleet.fleet.procstate import is_stopped, rss, wait_stopped
from skipfleet.fleet.proxy import ProxyLoop, TcpProxy
from skipfleet.fleet.runstate import write_run_state
from skipfleet.processes import AgentProcess


@dataclass(frozen=True)
class AgentSpec:
    device_id: str
    data_file: Path
    extra_args: tuple[str, ...] = ()  # after the fleet-wide agent args: these win


SpecFactory = Callable[[int], AgentSpec]  # device index (0, 1, ...) -> its spec, for scale()


@dataclass(eq=False)
class _Device:
    index: int
    spec: AgentSpec
    proxy: TcpProxy
    home: Path
    process: AgentProcess | None = None
    boots: int = 0
    started: float = 0.0  # time.monotonic() of the current start
    cut: CutMode | None = None  # its own cut; the broker's comes on top
    exit_code: int | None = None

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def log_path(self) -> Path:
        return self.home / f"agent-{max(self.boots - 1, 0)}.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


class ProcessFleet:
    def __init__(self, broker_url: str, base_model: Path, specs: Sequence[AgentSpec],
                 run_dir: Path, *, agent_args: Sequence[str] = (),
                 factory: SpecFactory | None = None, stop_timeout_s: float = 20.0):  # fmt: skip
        self.broker_url = broker_url
        self._upstream, self._userinfo = _broker_address(broker_url)
        self.base_model = Path(base_model)
        self.run_dir = Path(run_dir)
        self.agent_args = tuple(agent_args)
        self.control_url: str | None = None
        self._initial = list(specs)
        self._factory = factory
        self._stop_timeout_s = stop_timeout_s
        self._devices: dict[str, _Device] = {}
        self._broker_cut: CutMode | None = None
        self._lock = threading.RLock()
        self._proxies: ProxyLoop | None = None
        self._running = False
        self._next_index = 0

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> ProcessFleet:
        with self._lock:
            self._proxies = ProxyLoop()
            self._running = True
            try:
                for spec in self._initial:
                    self._add(spec)
            except BaseException:
                self.stop()  # no orphan agents or proxy thread from a half-started fleet
                raise
            self._save()
        return self

    def stop(self) -> None:
        """SIGTERM every agent (they announce `offline`), wait, SIGKILL the stragglers."""
        with self._lock:
            if not self._running:
                return
            self._terminate(self._devices.values())
            self._proxies.close()
            self._running, self.control_url = False, None
            self._save()

    def set_control_url(self, url: str | None) -> None:
        with self._lock:
            self.control_url = url
            self._save()

    def __enter__(self) -> ProcessFleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the fleet interface ---------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        with self._lock:
            return [self._info(d) for d in self._devices.values()]

    def device(self, device_id: str) -> DeviceInfo:
        with self._lock:
            return self._info(self._get(device_id, change=False))

    def kill(self, device_id: str) -> DeviceInfo:
        with self._lock:
            device = self._alive(device_id, "kill")
            device.exit_code = device.process.stop(signal.SIGKILL, timeout=5.0)
            return self._changed(device)

    def pause(self, device_id: str) -> DeviceInfo:
        with self._lock:
            device = self._alive(device_id, "pause")
            device.process.send_signal(signal.SIGSTOP)
            wait_stopped(device.process.pid, True)
            return self._changed(device)

    def resume(self, device_id: str) -> DeviceInfo:
        with self._lock:
            device = self._alive(device_id, "resume")
            device.process.send_signal(signal.SIGCONT)
            wait_stopped(device.process.pid, False)
            return self._changed(device)

    def cut(self, device_id: str, mode: CutMode = CutMode.BLACKHOLE) -> DeviceInfo:
        with self._lock:
            device = self._get(device_id)
            device.cut = CutMode(mode)
            self._apply_network(device)
            return self._changed(device)

    def restore(self, device_id: str) -> DeviceInfo:
        with self._lock:
            device = self._get(device_id)
            device.cut = None
            self._apply_network(device)
            return self._changed(device)

    def cut_broker(self, mode: CutMode = CutMode.BLACKHOLE) -> list[DeviceInfo]:
        with self._lock:
            self._check_running()
            self._broker_cut = CutMode(mode)
            return self._apply_network_all()

    def restore_broker(self) -> list[DeviceInfo]:
        with self._lock:
            self._check_running()
            self._broker_cut = None
            return self._apply_network_all()

    def restart(self, device_id: str) -> DeviceInfo:
        """Stop it gracefully if it runs, then start it again on the same state dir and proxy."""
        with self._lock:
            device = self._get(device_id)
            self._terminate([device])
            self._launch(device)
            return self._changed(device)

    def join(self, spec: AgentSpec) -> DeviceInfo:
        """A device that joins the fleet now (a late arrival)."""
        with self._lock:
            self._check_running()
            self._add(spec)
            return self._changed(self._devices[spec.device_id])

    def scale(self, n: int) -> list[DeviceInfo]:
        """Start devices from the factory up to n, or stop the highest-numbered ones."""
        with self._lock:
            self._check_running()
            n = check_count(n)
            if n > len(self._devices) and self._factory is None:
                raise Unsupported("this fleet has no device factory: it can only scale down")
            while len(self._devices) < n:
                self._add(self._factory(self._next_index))
            self._remove(list(self._devices.values())[n:])
            self._save()
            return self.devices()

    # -- internals ---------------------------------------------------------------------------
    def _check_running(self) -> None:
        if not self._running:
            raise FleetUnavailable("the fleet is stopped")

    def _get(self, device_id: str, change: bool = True) -> _Device:
        if change:
            self._check_running()
        device = self._devices.get(device_id)
        if device is None:
            known = ", ".join(self._devices) or "none"
            raise UnknownDevice(f"unknown device {device_id!r} (devices: {known})")
        return device

    def _alive(self, device_id: str, verb: str) -> _Device:
        device = self._get(device_id)
        if not device.alive():
            raise DeviceStateError(f"cannot {verb} {device_id}: it is dead ({_exit(device)})")
        return device

    def _changed(self, device: _Device) -> DeviceInfo:
        self._save()
        return self._info(device)

    def _add(self, spec: AgentSpec) -> None:
        if spec.device_id in self._devices:
            raise InvalidRequest(f"device {spec.device_id!r} is in the fleet already")
        proxy = self._proxies.open(*self._upstream, name=spec.device_id)
        home = self.run_dir / "devices" / spec.device_id
        device = _Device(self._next_index, spec, proxy, home)
        self._next_index += 1
        self._devices[spec.device_id] = device
        self._apply_network(device)  # a device joining during a broker cut is cut too
        self._launch(device)

    def _remove(self, devices: list[_Device]) -> None:
        self._terminate(devices)
        for device in devices:
            device.proxy.close()
            del self._devices[device.spec.device_id]
        if devices:  # the next scale-up reuses their indices, ids and state dirs
            self._next_index = min(d.index for d in devices)

    def _launch(self, device: _Device) -> None:
        device.boots += 1
        device.exit_code = None
        device.started = time.monotonic()
        url = f"mqtt://{self._userinfo}127.0.0.1:{device.proxy.port}"
        device.process = AgentProcess(
            device.spec.device_id, url, device.spec.data_file, self.base_model,
            device.state_dir, device.log_path, extra=(*self.agent_args, *device.spec.extra_args),
        )  # fmt: skip

    def _terminate(self, devices: Iterable[_Device]) -> None:
        """SIGTERM all at once (a stopped process must be continued to see it), then wait.

        Exactly one SIGTERM each: a second one could land while Python is finalising, after
        the agent's handler is gone, and kill an agent that was shutting down cleanly.
        """
        devices = [d for d in devices if d.process is not None]
        for device in devices:
            device.process.send_signal(signal.SIGCONT)
            device.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout_s
        for device in devices:
            with contextlib.suppress(subprocess.TimeoutExpired):
                device.process.process.wait(max(deadline - time.monotonic(), 0.1))
            # Signals only a straggler (SIGKILL); for the others it reaps and closes the log.
            device.exit_code = device.process.stop(signal.SIGKILL, timeout=5.0)

    def _apply_network(self, device: _Device) -> None:
        mode = device.cut or self._broker_cut  # its own cut wins over the broker's
        if mode is None:
            device.proxy.restore()
        elif device.proxy.mode is not mode:
            device.proxy.cut(mode)

    def _apply_network_all(self) -> list[DeviceInfo]:
        for device in self._devices.values():
            self._apply_network(device)
        self._save()
        return self.devices()

    def _info(self, device: _Device) -> DeviceInfo:
        alive = device.alive()
        pid = device.process.pid if alive else None
        return DeviceInfo(
            device_id=device.spec.device_id,
            state=_state(device),
            pid=pid,
            uptime_s=round(time.monotonic() - device.started, 3) if alive else None,
            rss_bytes=rss(pid) if alive else None,
            detail=_detail(device),
        )

    def _save(self) -> None:
        write_run_state(self.run_dir, {
            "running": self._running,
            "owner_pid": os.getpid(),
            "broker": self.broker_url,
            "control_url": self.control_url,
            "broker_cut": self._broker_cut,
            "devices": [_record(d) for d in self._devices.values()],
        })  # fmt: skip


def _broker_address(url: str) -> tuple[tuple[str, int], str]:
    """(host, port) to proxy to, and the `user:pass@` part the agents keep using."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        # The agents would check the broker's TLS certificate against 127.0.0.1, the proxy.
        raise InvalidRequest(f"broker {url!r}: a process fleet proxies plain mqtt:// only")
    if not parts.hostname:
        raise InvalidRequest(f"broker {url!r}: no host")
    userinfo = parts.netloc.rpartition("@")[0]
    return (parts.hostname, parts.port or 1883), f"{userinfo}@" if userinfo else ""


def _state(device: _Device) -> DeviceState:
    if not device.alive():
        return DeviceState.DEAD
    if is_stopped(device.process.pid):
        return DeviceState.PAUSED
    if device.proxy.mode is not None:
        return DeviceState.CUT
    return DeviceState.RUNNING


def _detail(device: _Device) -> str:
    parts = [f"proxy :{device.proxy.port}"]
    if device.proxy.mode is not None:
        parts.append(f"cut: {device.proxy.mode.value}" + ("" if device.cut else " (broker)"))
    if not device.alive():
        parts.append(_exit(device))
    if device.boots > 1:
        parts.append(f"boot {device.boots}")
    return ", ".join(parts)


def _exit(device: _Device) -> str:
    if device.process is None:
        return "never started"
    code = device.process.process.poll() if device.exit_code is None else device.exit_code
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def _record(device: _Device) -> dict:
    return {
        "device_id": device.spec.device_id,
        "index": device.index,
        "pid": device.process.pid if device.alive() else None,
        "state": _state(device).value,
        "proxy_port": device.proxy.port,
        "cut": device.cut,
        "boots": device.boots,
        "log_path": str(device.log_path),
        "state_dir": str(device.state_dir),
        "data_file": str(device.spec.data_file),
    }
