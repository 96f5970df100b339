"""`skipfleet fleet`: list a running fleet's devices, scale it, inject faults.

    skipfleet fleet --control http://127.0.0.1:PORT --token-file RUN/control-token kill DEV
    skipfleet fleet --run-dir RUN kill fan-8cm-silenta-normal    ... found through RUN/fleet.json
    skipfleet fleet --docker [--project skipfleet] pause device-2   the docker compose fleet

Exit codes: 0 done, 1 other failure, 2 usage (also a bad device count or cut mode),
3 no fleet reachable, 4 unknown device, 5 refused in the device's state or unsupported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from enum import IntEnum
from pathlib import Path

from skipfleet.fleet.base import (
    CutMode,
    DeviceInfo,
    DeviceStateError,
    FleetError,
    FleetUnavailable,
    InvalidRequest,
    UnknownDevice,
    Unsupported,
    Verb,
)
from skipfleet.fleet.runstate import CONTROL_TOKEN_FILE

BROKER_ACTIONS = ("cut-broker", "restore-broker")
ENV_TOKEN_FILE = "SKIPFLEET_FLEET_TOKEN_FILE"

VERB_HELP = {
    Verb.KILL: "SIGKILL the agent (its Will announces it offline)",
    Verb.PAUSE: "freeze the agent (SIGSTOP / docker pause)",
    Verb.RESUME: "unfreeze a paused agent",
    Verb.CUT: "cut the agent's network to the broker",
    Verb.RESTORE: "restore the agent's network",
    Verb.RESTART: "stop the agent gracefully if it runs, start it again on the same state",
}


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    UNKNOWN_DEVICE = 4
    REFUSED = 5


EXIT_CODES = {
    InvalidRequest: ExitCode.USAGE,
    FleetUnavailable: ExitCode.UNREACHABLE,
    UnknownDevice: ExitCode.UNKNOWN_DEVICE,
    DeviceStateError: ExitCode.REFUSED,
    Unsupported: ExitCode.REFUSED,
}


def configure(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--control", metavar="URL", help="a process fleet's control endpoint")
    target.add_argument("--run-dir", metavar="DIR", help="a process fleet's run dir (fleet.json)")
    target.add_argument("--docker", action="store_true", help="the docker compose fleet")
    parser.add_argument(
        "--token-file",
        help=f"with --control: the fleet's {CONTROL_TOKEN_FILE} file, needed to change anything "
        f"(default ${ENV_TOKEN_FILE}; --run-dir finds it in the run dir)",
    )
    parser.add_argument(
        "--project",
        help="compose project with --docker (default: $COMPOSE_PROJECT_NAME, else skipfleet)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows, not a table")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("ls", help="list the devices")
    scale = actions.add_parser("scale", help="start or stop devices until there are N")
    scale.add_argument("n", type=_count, metavar="N")
    for verb, help_text in VERB_HELP.items():
        action = actions.add_parser(verb.value, help=help_text)
        action.add_argument("device", metavar="DEV")
        if verb is Verb.CUT:
            _mode_option(action)
    _mode_option(actions.add_parser("cut-broker", help="cut the broker off from every agent"))
    actions.add_parser("restore-broker", help="restore the broker's network")


def _mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=[m.value for m in CutMode], default="blackhole",
                        help="blackhole: silence, found by keepalive (default); "
                             "refuse: connections reset at once (process fleet only)")  # fmt: skip


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device count (a whole number >= 0)")
    return n


def main(args: argparse.Namespace) -> int:
    try:
        rows = run(open_fleet(args, os.environ), args)
    except FleetError as err:
        print(f"skipfleet fleet: {err}", file=sys.stderr)
        return int(EXIT_CODES.get(type(err), ExitCode.FAILED))
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=2))
    else:
        print(table(rows))
    return ExitCode.OK


def open_fleet(args: argparse.Namespace, environ: Mapping[str, str]):
    if args.project and not args.docker:
        raise InvalidRequest("--project goes with --docker")
    if args.token_file and not args.control:
        raise InvalidRequest("--token-file goes with --control")
    if args.docker:
        from skipfleet.fleet.docker_backend import DockerFleet

        # As compose names the project: COMPOSE_PROJECT_NAME (also set by the repository's .env).
        return DockerFleet(args.project or os.environ.get("COMPOSE_PROJECT_NAME") or "skipfleet")
    from skipfleet.fleet.remote import RemoteFleet

    if args.control:
        token_file = args.token_file or environ.get(ENV_TOKEN_FILE)
        return RemoteFleet(args.control, token_file=Path(token_file) if token_file else None)
    if args.run_dir:
        from skipfleet.fleet.runstate import control_url_of, fleet_dir_of

        run_dir = fleet_dir_of(Path(args.run_dir))
        token_file = run_dir / CONTROL_TOKEN_FILE
        return RemoteFleet(
            control_url_of(run_dir), token_file=token_file if token_file.exists() else None
        )
    raise InvalidRequest("which fleet? give --control URL, --run-dir DIR or --docker")


def run(fleet, args: argparse.Namespace) -> list[DeviceInfo]:
    mode = CutMode(getattr(args, "mode", None) or CutMode.BLACKHOLE)
    match args.action:
        case "ls":
            return fleet.devices()
        case "scale":
            return fleet.scale(args.n)
        case "cut-broker":
            return fleet.cut_broker(mode)
        case "restore-broker":
            return fleet.restore_broker()
        case Verb.CUT:
            return [fleet.cut(args.device, mode)]
    return [getattr(fleet, Verb(args.action).value)(args.device)]


def table(rows: list[DeviceInfo]) -> str:
    if not rows:
        return "no devices"
    lines = [("DEVICE", "STATE", "PID", "UPTIME", "RSS", "DETAIL")] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cells(row: DeviceInfo) -> tuple[str, ...]:
    return (row.device_id, row.state.value, _or_dash(row.pid), _duration(row.uptime_s),
            _mib(row.rss_bytes), row.detail)  # fmt: skip


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f}M"
