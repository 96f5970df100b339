"""`skipfleet agent`: run the device agent for one device until SIGTERM/SIGINT.

SIGUSR1 switches a simulated device to its drifted data (see agent.simulation).

    skipfleet agent --device-id pi-07 --broker mqtt://broker:1883 \\
        --data /var/lib/skipfleet/device.npz --base-model /opt/skipfleet/base.npz \\
        --state-dir /var/lib/skipfleet/state

Exit codes: 0 after a clean stop; 2 a config file (or variable) that cannot be read; 64 bad
configuration, 65 unusable base model, 66 unusable device data, 73 state dir not writable,
77 broker refused our credentials, 70 internal error.
Only argparse-level imports at module level: `skipfleet --help` imports this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from agent.config import add_arguments

log = logging.getLogger("agent")


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from agent.trainer.blas import limit_blas_threads, set_thread_env

    set_thread_env(os.environ)  # before NumPy loads, where this is the entry point
    limit_blas_threads()  # and where something loaded it already

    from agent.config import from_args
    from agent.errors import ExitCode, FatalError
    from agent.runtime import Agent
    from shared.config_file import EXIT_USAGE, ConfigFileError, resolve_args

    try:  # flags, environment, config file and defaults merged once, here
        args = resolve_args(args, os.environ)
    except ConfigFileError as err:
        print(f"skipfleet agent: {err}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    early_drift = []  # SIGUSR1 while loading: kept for later instead of killing the process
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: early_drift.append(signum))
    try:
        agent = Agent(from_args(args, os.environ))
    except FatalError as err:
        signal.signal(signal.SIGUSR1, before)
        print(f"skipfleet agent: {err}", file=sys.stderr)
        return int(err.exit_code)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: agent.request_stop())
    signal.signal(signal.SIGUSR1, lambda signum, frame: agent.request_drift())
    if early_drift:
        agent.request_drift()
    try:
        return int(agent.run())
    except Exception:
        log.exception("agent crashed")
        return int(ExitCode.INTERNAL)
