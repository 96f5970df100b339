"""`DockerFleet`: the fault verbs on the docker compose fleet, through the Docker SDK.

Devices are the containers of compose service `agent` in the project (label
`com.docker.compose.project`); their ids are derived the way deploy/agent-entrypoint.sh does it
(`device_id_for`). The verbs map to the engine: kill (SIGKILL), pause/unpause (cgroup freezer),
restart, and cut = disconnecting the container from all its networks, which is a blackhole:
the peer gets no RST, only keepalive finds out. What a cut disconnected (networks and DNS
aliases: `mosquitto` must resolve again after a broker cut) is recorded in a small JSON file, so
`cut` and `restore` may come from two `skipfleet fleet` invocations.

Limits, stated where they apply: no `refuse` cut mode; `restore` gives back networks and aliases,
not static IP addresses or links; `scale` clones an existing agent container (see clone_config)
and compose's own replica count does not know about the clones.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import device_id_from_hostname
from skipfleet.fleet.base import (
    CutMode,
    DeviceInfo,
    DeviceState,
    DeviceStateError,
    FleetError,
    FleetUnavailable,
    UnknownDevice,
    Unsupported,
    check_count,
)

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
AGENT_SERVICE, BROKER_SERVICE = "agent", "mosquitto"
# deploy/agent-entrypoint.sh: replica n of the agent service (`<project>-agent-n`, compose v1
# `<project>_agent_n`) is device `device-(n-1)`.
REPLICA_NAME = re.compile(r"[-_]agent[-_]0*([1-9][0-9]{0,8})$")
ENV_DEVICE_ID = "SKIPFLEET_DEVICE_ID"
STATES = {"running": DeviceState.RUNNING, "paused": DeviceState.PAUSED}  # anything else: dead


def device_id_for(name: str, env: Sequence[str] | None = None) -> str:
    """The device id deploy/agent-entrypoint.sh gives the container `name` (with its `env`).

    SKIPFLEET_DEVICE_ID wins; a compose replica `<project>-agent-n` is `device-(n-1)`; any
    other name is sanitised as a host name (agent.config.device_id_from_hostname: lower case,
    runs outside [a-z0-9-] -> '-', trimmed, at most 64 characters).
    """
    for item in env or ():
        key, _, value = item.partition("=")
        if key == ENV_DEVICE_ID and value:
            return value
    match = REPLICA_NAME.search(name)
    if match:
        return f"device-{int(match.group(1)) - 1}"
    return device_id_from_hostname(name)


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect_engine(from_env=None) -> Any:
    """A Docker client that answered a ping, or FleetUnavailable saying what to do."""
    try:
        if from_env is None:
            import docker  # only here: the process fleet and its tests never need the SDK

            from_env = docker.from_env
        client = from_env()
        client.ping()
    except ImportError:
        raise FleetUnavailable(
            "the docker Python SDK is not installed (pip install docker)"
        ) from None
    except Exception as err:  # DockerException, requests' errors, a refused socket...
        raise FleetUnavailable(
            f"no Docker engine answers at {engine_address()}: {err}. Start Docker (or set "
            "DOCKER_HOST), or drive a process fleet with --control URL or --run-dir DIR"
        ) from None
    return client


def clone_config(attrs: dict, number: int, networks: dict[str, list[str]]) -> dict:
    """The create-container body for replica `number`, cloned from an agent's inspect data.

    Config and HostConfig are copied as the engine reports them (image, command, environment,
    mounts incl. compose secrets and volumes, limits, init, tmpfs, healthcheck, restart policy),
    with the replica number label changed. The hostname is left out so that the engine gives
    the container its id as hostname: the entrypoint resolves its name from that.
    """
    config = {k: v for k, v in attrs["Config"].items() if k not in ("Hostname", "MacAddress")}
    config["Labels"] = {**(config.get("Labels") or {}), NUMBER_LABEL: str(number)}
    first = next(iter(networks), None)  # the create call takes one network; more are connected
    endpoints = {} if first is None else {first: {"Aliases": networks[first]}}
    return {**config, "HostConfig": dict(attrs["HostConfig"]),
            "NetworkingConfig": {"EndpointsConfig": endpoints}}  # fmt: skip


def default_cuts_path(project: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "skipfleet" / f"docker-cuts-{project}.json"


class DockerFleet:
    def __init__(self, project: str = "skipfleet", *, client: Any = None,
                 cuts_path: Path | None = None, stop_timeout_s: int = 20) -> None:  # fmt: skip
        self.client = client if client is not None else connect_engine()
        self.project = project
        self.cuts_path = cuts_path or default_cuts_path(project)
        self.stop_timeout_s = stop_timeout_s

    # -- the fleet interface ---------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return [self._info(c, fresh=True) for c in self._agents().values()]

    def device(self, device_id: str) -> DeviceInfo:
        return self._info(self._get(device_id), fresh=True)

    def kill(self, device_id: str) -> DeviceInfo:
        """SIGKILL the agent as a crash would, so that the container's restart policy applies.

        The engine's own kill counts as a deliberate stop, which suspends the restart policy; so
        where the container has an init (compose `init: true`), every process but that init is
        killed from inside and the init exits with the agent's status, as after a crash. Without
        an init the agent is PID 1, which ignores SIGKILL from inside its namespace: the engine
        kills it then, and it stays down until `restart`.
        """
        container = self._live(device_id, "kill")
        if container.status == "paused":  # the engine refuses to signal a frozen container
            container.unpause()
        if not container.attrs["HostConfig"].get("Init"):
            container.kill()
            return self._info(container)
        started = container.attrs["State"].get("StartedAt")
        container.exec_run(["sh", "-c", "kill -KILL -1"])  # all but PID 1 and the caller
        self._wait_for_exit(container, started)
        return self._info(container)

    def pause(self, device_id: str) -> DeviceInfo:
        container = self._live(device_id, "pause")
        if container.status != "paused":
            container.pause()
        return self._info(container)

    def resume(self, device_id: str) -> DeviceInfo:
        container = self._live(device_id, "resume")
        if container.status == "paused":
            container.unpause()
        return self._info(container)

    def cut(self, device_id: str, mode: CutMode = CutMode.BLACKHOLE) -> DeviceInfo:
        container = self._get(device_id)
        self._disconnect(container, CutMode(mode))
        return self._info(container)

    def restore(self, device_id: str) -> DeviceInfo:
        container = self._get(device_id)
        self._reconnect(container)
        return self._info(container)

    def cut_broker(self, mode: CutMode = CutMode.BLACKHOLE) -> list[DeviceInfo]:
        self._disconnect(self._broker(), CutMode(mode))
        return self.devices()

    def restore_broker(self) -> list[DeviceInfo]:
        self._reconnect(self._broker())
        return self.devices()

    def restart(self, device_id: str) -> DeviceInfo:
        """A graceful restart (a dead container is started); volumes keep its state dir."""
        container = self._get(device_id)
        if container.status == "paused":
            container.unpause()
        container.restart(timeout=self.stop_timeout_s)
        return self._info(container)

    def scale(self, n: int) -> list[DeviceInfo]:
        """Clone an agent container up to n replicas, or stop and remove the highest-numbered."""
        n = check_count(n)
        agents = sorted(self._containers(AGENT_SERVICE), key=_number)
        for container in agents[n:][::-1]:
            if container.status == "paused":
                container.unpause()
            container.stop(timeout=self.stop_timeout_s)
            container.remove()
            self._forget_cut(container)
        if n > len(agents):
            self._clone(agents, n)
        return self.devices()

    # -- containers ------------------------------------------------------------------------
    def _containers(self, service: str) -> list[Any]:
        labels = [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]
        return self.client.containers.list(all=True, filters={"label": labels})

    def _agents(self) -> dict[str, Any]:
        agents = sorted(self._containers(AGENT_SERVICE), key=_number)
        return {device_id_for(c.name, c.attrs["Config"].get("Env")): c for c in agents}

    def _get(self, device_id: str) -> Any:
        agents = self._agents()
        if device_id not in agents:
            known = ", ".join(agents) or "none"
            raise UnknownDevice(f"unknown device {device_id!r} in compose project "
                                f"{self.project!r} (devices: {known})")  # fmt: skip
        return agents[device_id]

    def _live(self, device_id: str, verb: str) -> Any:
        container = self._get(device_id)
        if container.status not in STATES:
            raise DeviceStateError(f"cannot {verb} {device_id}: container {container.name} "
                                   f"is {container.status}")  # fmt: skip
        return container

    def _broker(self) -> Any:
        brokers = self._containers(BROKER_SERVICE)
        if not brokers:
            raise FleetError(f"no {BROKER_SERVICE} container in compose project {self.project!r}")
        return brokers[0]

    def _info(self, container: Any, fresh: bool = False) -> DeviceInfo:
        if not fresh:  # after an action: what the engine says now
            container.reload()
        engine_state = container.attrs["State"]
        alive = container.status in STATES
        cut = alive and not _attached(container)
        state = STATES.get(container.status, DeviceState.DEAD)
        return DeviceInfo(
            device_id=device_id_for(container.name, container.attrs["Config"].get("Env")),
            state=DeviceState.CUT if cut and state is DeviceState.RUNNING else state,
            pid=engine_state.get("Pid") or None,
            uptime_s=_uptime(engine_state.get("StartedAt")) if alive else None,
            rss_bytes=self._rss(container) if alive else None,
            detail=f"{container.name} ({container.status}{', no network' if cut else ''})",
        )

    def _wait_for_exit(self, container: Any, started: str | None) -> None:
        """Until the engine has seen the container exit (or already restart it)."""
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            container.reload()
            restarted = container.attrs["State"].get("StartedAt") != started
            if container.status != "running" or restarted:
                return
            time.sleep(0.1)

    def _rss(self, container: Any) -> int | None:
        try:
            memory = container.stats(stream=False, one_shot=True)["memory_stats"]
            stats = memory.get("stats") or {}
            # What `docker stats` shows: usage without the reclaimable page cache.
            cache = stats.get("inactive_file", stats.get("total_inactive_file", 0))
            return int(memory["usage"]) - int(cache)
        except Exception:  # no stats for this container right now: leave the column empty
            return None

    def _clone(self, agents: list[Any], n: int) -> None:
        if not agents:
            raise Unsupported("no agent container to clone: start the project with "
                              "`docker compose up --scale agent=N` first")  # fmt: skip
        template = agents[0]
        networks = self._networks_of(template)
        taken = {_number(c) for c in agents}
        numbers = (k for k in range(1, 1_000_000) if k not in taken)
        for number in [next(numbers) for _ in range(n - len(agents))]:
            body = clone_config(template.attrs, number, _service_aliases(networks))
            name = f"{self.project}-{AGENT_SERVICE}-{number}"
            created = self.client.api.create_container_from_config(body, name=name)
            container = self.client.containers.get(created["Id"])
            for network in list(networks)[1:]:
                self.client.networks.get(network).connect(container, aliases=[AGENT_SERVICE])
            container.start()

    # -- network cuts ----------------------------------------------------------------------
    def _disconnect(self, container: Any, mode: CutMode) -> None:
        if mode is not CutMode.BLACKHOLE:
            raise Unsupported(
                "the Docker backend cuts by disconnecting the container from its networks, "
                "which is a blackhole; `refuse` is not supported"
            )
        container.reload()
        networks = _attached(container)
        if not networks:
            return  # cut already
        cuts = self._load_cuts()
        cuts[container.id] = networks
        self._save_cuts(cuts)
        for name in networks:
            self.client.networks.get(name).disconnect(container)

    def _reconnect(self, container: Any) -> None:
        container.reload()
        cuts = self._load_cuts()
        networks = cuts.pop(container.id, None) or self._networks_of(container)
        attached = _attached(container)
        for name, aliases in networks.items():
            if name not in attached:
                self.client.networks.get(name).connect(container, aliases=aliases or None)
        self._save_cuts(cuts)

    def _forget_cut(self, container: Any) -> None:
        cuts = self._load_cuts()
        if cuts.pop(container.id, None) is not None:
            self._save_cuts(cuts)

    def _networks_of(self, container: Any) -> dict[str, list[str]]:
        """Its networks now, else as recorded at the cut, else the project's (service alias)."""
        attached = _attached(container)
        if attached:
            return attached
        recorded = self._load_cuts().get(container.id)
        if recorded:
            return recorded
        service = container.labels.get(SERVICE_LABEL, AGENT_SERVICE)
        project = self.client.networks.list(filters={"label": f"{PROJECT_LABEL}={self.project}"})
        return {network.name: [service] for network in project}

    def _load_cuts(self) -> dict[str, dict[str, list[str]]]:
        try:
            return json.loads(self.cuts_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise FleetError(f"{self.cuts_path}: unreadable record of cuts: {err}") from None

    def _save_cuts(self, cuts: dict) -> None:
        self.cuts_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cuts_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cuts, indent=2))
        os.replace(tmp, self.cuts_path)


def _attached(container: Any) -> dict[str, list[str]]:
    """network name -> DNS aliases, as the engine reports them for this container."""
    networks = container.attrs["NetworkSettings"]["Networks"] or {}
    return {name: list(net.get("Aliases") or []) for name, net in networks.items()}


def _service_aliases(networks: dict[str, list[str]]) -> dict[str, list[str]]:
    # A clone answers to the service name only; the template's own name and id stay its own.
    return {name: [AGENT_SERVICE] for name in networks}


def _number(container: Any) -> int:
    try:
        return int(container.labels.get(NUMBER_LABEL, "0"))
    except ValueError:
        return 0


def _uptime(started_at: str | None) -> float | None:
    """Seconds since the engine's `StartedAt` (RFC 3339 with nanoseconds)."""
    if not started_at:
        return None
    head, _, rest = started_at.rstrip("Z").partition(".")
    micro = (rest[:6] if rest else "0").ljust(6, "0")
    try:
        started = datetime.fromisoformat(f"{head}.{micro}+00:00")
    except ValueError:
        return None
    return round(time.time() - started.timestamp(), 3)
