"""A local multi-node Ray cluster on this machine: `ray start --head` plus more `ray start
--address` nodes, each with a custom resource (`node_0`, `node_1`, ...) a partition of a
partitioned coordinator can be pinned to (--partition-resources). For tests and
`skipfleet bench coordinator --ray-nodes N`: one more node stands in for one more machine.

Each node is `ray start --block` in its own session, stopped by signalling that process group
only: `ray stop` would end every Ray on the machine, other users' included. The nodes listen on
127.0.0.1 with Ray's token authentication off (a loopback cluster of our own); a real cluster
keeps Ray's default token auth (docs/coordinator.md, "Scaling out").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skipfleet.brokers import free_port
from skipfleet.processes import child_env

STARTED = "Ray runtime started"
# Set in the environment of the nodes and of every process that joins them.
NO_TOKEN_AUTH = {"RAY_AUTH_MODE": "disabled"}


def node_resource(index: int) -> str:
    return f"node_{index}"


class RayNode:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        ray_cli = Path(sys.executable).with_name("ray")
        self.process = subprocess.Popen(
            [str(ray_cli), "start", "--block", "--disable-usage-stats", *args],
            env=child_env(**NO_TOKEN_AUTH), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while STARTED not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ray start did not start a node: {tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the node's process group, SIGKILL if it lingers."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            self.process.wait()
        self._log.close()


class LocalRayCluster:
    """`nodes` Ray nodes on this machine, node i offering the resource node_i (1 unit)."""

    def __init__(self, nodes: int, cpus_per_node: int, log_dir: Path) -> None:
        self._nodes_wanted = nodes
        self._cpus = cpus_per_node
        self._log_dir = Path(log_dir)
        self._temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # Ray's socket paths: short
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []

    @property
    def resources(self) -> list[str]:
        return [node_resource(i) for i in range(self._nodes_wanted)]

    @property
    def pids(self) -> list[int]:
        return [node.pid for node in self.nodes]

    def start(self, timeout_s: float = 60.0) -> LocalRayCluster:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        try:
            head = [f"--port={self.port}", f"--temp-dir={self._temp}",
                    "--include-dashboard=false", f"--dashboard-port={free_port()}"]  # fmt: skip
            for index in range(self._nodes_wanted):
                where = ["--head", *head] if index == 0 else [f"--address={self.address}"]
                node = RayNode(
                    [*where, *self._node_args(index)], self._log_dir / f"ray-{index}.log"
                )
                self.nodes.append(node)
                node.wait_started(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_args(self, index: int) -> list[str]:
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self._cpus}",
            f'--resources={{"{node_resource(index)}": 1}}',
            # fixed defaults another Ray on this machine may hold
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes = []
        shutil.rmtree(self._temp, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
