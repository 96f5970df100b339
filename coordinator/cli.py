"""`skipfleet coordinator`: run the fleet coordinator until SIGTERM/SIGINT.

    skipfleet coordinator --broker mqtt://broker:1883 --state-dir /var/lib/skipfleet-coordinator \\
        [--ray-address local|auto|ADDRESS] [--metrics-port 9464] [--api-port 8080] ...

Exit codes: 0 after a clean stop; 2 a config file (or variable) that cannot be read; 64 bad
configuration (also an unusable API token file); 69 Ray could not be started or joined, or the
coordinator extra (Ray, prometheus-client) is not installed; 70 internal error (the fleet actor
did not start, or a crash);
71 the API or /metrics port cannot be bound; 73 the state dir is not writable; 75 another
coordinator runs this instance (its state dir is locked, its fleet actor answers, or it took our
MQTT session over) or shares our MQTT account (each connection closed at once, again and again:
coordinator.account_fight); 77 the broker refused our credentials.

With a local Ray the coordinator leads its own process group and starts coordinator.reaper first:
whatever way it ends (SIGTERM, SIGINT, a crash, SIGKILL), no Ray process it started outlives it.
Only argparse-level imports at module level: `skipfleet --help` imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.config import add_arguments
from coordinator.instance import STATE_DIR_MODE

if TYPE_CHECKING:
    from coordinator.app import Coordinator
    from coordinator.config import CoordinatorConfig
    from coordinator.partitioned_app import PartitionedCoordinator

log = logging.getLogger("coordinator")


class ExitCode(IntEnum):
    OK = 0
    CONFIG = 64
    RAY_UNAVAILABLE = 69
    INTERNAL = 70
    PORT_UNAVAILABLE = 71
    STATE_DIR = 73
    INSTANCE_CONFLICT = 75
    BROKER_REFUSED = 77


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def prepare_state_dir(path: Path) -> None:
    """Create the state dir and prove it is writable now, not at the first checkpoint. A new
    one is made 0700 (the fleet's records and the API token are in it); an existing one keeps
    the mode its operator gave it (the images' is 0750: a group of its own), with a warning if
    every user may enter it."""
    path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        log.warning(
            "the state dir %s is mode %04o: every user of this host may read the fleet's "
            "records (the API token file itself is 0600); chmod o-rwx it unless that is meant",
            path,
            mode,
        )
    probe = path / ".write-probe"
    probe.write_bytes(b"ok")
    probe.unlink()


def fail(code: int, message: str) -> int:
    print(f"skipfleet coordinator: {message}", file=sys.stderr)
    return int(code)


def main(args: argparse.Namespace) -> int:
    from coordinator.config import ConfigError, from_args
    from shared.config_file import EXIT_USAGE, ConfigFileError, resolve_args

    try:  # flags, environment, config file and defaults merged once, here
        args = resolve_args(args, os.environ)
    except ConfigFileError as err:
        return fail(EXIT_USAGE, str(err))
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = from_args(args, os.environ)
    except ConfigError as err:
        return fail(ExitCode.CONFIG, f"invalid configuration: {err}")
    missing = missing_extra()  # before anything is written: an agent-only install (a Pi)
    if missing:
        return fail(ExitCode.RAY_UNAVAILABLE, missing)
    try:
        prepare_state_dir(config.state_dir)
    except OSError as err:
        return fail(ExitCode.STATE_DIR, f"state dir {config.state_dir}: {err.strerror or err}")
    try:
        return run(config)
    except Exception:
        log.exception("the coordinator crashed")
        return int(ExitCode.INTERNAL)


# What `pip install skipfleet[coordinator]` brings (pyproject.toml), by import name.
COORDINATOR_EXTRA = ("ray", "prometheus_client")
INSTALL_EXTRA = "pip install 'skipfleet[coordinator]'"


def missing_extra() -> str | None:
    """Why the coordinator cannot run here (what to install), or None. An agent-only install
    (a Pi) has no Ray: say so instead of a traceback."""
    missing = []
    for name in COORDINATOR_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    return (
        f"the coordinator needs the coordinator extra, and {', '.join(missing)} cannot be "
        f"imported here: run `{INSTALL_EXTRA}` (from a checkout: pip install -e '.[coordinator]')"
    )


def _start(config: CoordinatorConfig) -> Coordinator | PartitionedCoordinator:
    """One fleet actor fed by this process's MQTT bridge, or (--partitions N) N partition
    actors with their own ingests (imported only then: the default costs nothing more)."""
    from coordinator.app import Coordinator

    if not config.partitioned:
        return Coordinator.start(config)
    from coordinator.partitioned_app import PartitionedCoordinator

    return PartitionedCoordinator.start(config)


def run(config: CoordinatorConfig) -> int:
    import ray

    from coordinator.app import PortUnavailable, StartupError
    from coordinator.bridge import FatalReason
    from coordinator.heap import DRIVER_GC_THRESHOLDS, freeze_startup_heap, limit_arenas, tune_gc
    from coordinator.instance import InstanceConflict
    from coordinator.ray_runtime import init_ray
    from shared.http_auth import TokenFileError

    if not config.joins_cluster:  # the local Ray is ours: it must end with us, however we end
        from coordinator.reaper import lead_own_process_group, start_reaper

        lead_own_process_group()
        start_reaper()
    limit_arenas(os.environ)  # before ray.init: its processes inherit the limit
    try:
        init_ray(config)
    except Exception as err:  # ConnectionError, RuntimeError, ...: Ray says what went wrong
        where = config.ray_address
        return fail(ExitCode.RAY_UNAVAILABLE, f"cannot start or join Ray ({where}): {err}")
    # After ray.init, which installs a SIGTERM handler of its own that would end the process
    # before the bridge hands over the last messages.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    refusals = {
        PortUnavailable: ExitCode.PORT_UNAVAILABLE,
        StartupError: ExitCode.INTERNAL,
        InstanceConflict: ExitCode.INSTANCE_CONFLICT,
        TokenFileError: ExitCode.CONFIG,
    }
    try:
        coordinator = _start(config)
    except tuple(refusals) as err:
        ray.shutdown()
        code = next(c for kind, c in refusals.items() if isinstance(err, kind))
        return fail(code, str(err))
    freeze_startup_heap()
    tune_gc(DRIVER_GC_THRESHOLDS)
    try:
        while not stop.wait(0.5) and not coordinator.fatal.event.is_set():
            pass
    finally:
        log.info("shutting down")
        coordinator.stop()
        ray.shutdown()
    if coordinator.fatal.reason is not None:
        taken = (FatalReason.SESSION_TAKEN_OVER, FatalReason.ACCOUNT_SHARED)
        takeover = coordinator.fatal.kind in taken
        code = ExitCode.INSTANCE_CONFLICT if takeover else ExitCode.BROKER_REFUSED
        return fail(code, coordinator.fatal.reason)
    return int(ExitCode.OK)
