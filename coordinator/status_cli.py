"""`skipfleet status`: the fleet as a table, from the coordinator's HTTP API.

    skipfleet status [--api http://coordinator:8080] [--api-token-file FILE] [--json]

Reads need no token from the coordinator's own host (loopback); from anywhere else, give the
coordinator's token file (its state dir's `api-token`, or $SKIPFLEET_API_TOKEN_FILE).
Exit codes: 0 printed; 64 the token file is unusable; 69 the API cannot be reached; 70 the API
answered with an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.config import ENV_API_TOKEN_FILE
from shared.http_auth import TokenFileError, bearer_header, read_token_file

ENV_API = "SKIPFLEET_API"
EXIT_CONFIG = 64
EXIT_UNREACHABLE = 69
EXIT_API_ERROR = 70

Device = dict[str, Any]  # one device as GET /devices returns it (JSON)
Column = tuple[str, Callable[[Device], str]]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", help=f"coordinator API URL; default ${ENV_API} or localhost:8080")
    parser.add_argument(
        "--api-token-file",
        help=f"the coordinator's API token, for a coordinator on another host; "
        f"default ${ENV_API_TOKEN_FILE}",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the devices as the API gives them (a JSON list), for scripts, not a table",
    )


def main(args: argparse.Namespace) -> int:
    base = (args.api or os.environ.get(ENV_API) or "http://localhost:8080").rstrip("/")
    token_file = args.api_token_file or os.environ.get(ENV_API_TOKEN_FILE)
    try:
        headers = bearer_header(read_token_file(token_file) if token_file else None)
    except TokenFileError as err:
        print(f"skipfleet status: {err}", file=sys.stderr)
        return EXIT_CONFIG
    request = urllib.request.Request(f"{base}/devices", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            devices = json.load(response)
    except urllib.error.HTTPError as err:
        print(f"skipfleet status: {base} answered {err.code}: {_error_body(err)}", file=sys.stderr)
        return EXIT_API_ERROR
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        message = f"cannot reach the coordinator at {base}: {reason}"
        print(f"skipfleet status: {message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    as_json = getattr(args, "json", False)  # a Namespace made by hand may not have it
    print(json.dumps(devices, indent=2) if as_json else format_table(devices))
    return 0


def _error_body(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read()).get("error", ""))
    except (ValueError, AttributeError, OSError):
        return err.reason


def _number(key: str, digits: int) -> Callable[[Device], str]:
    def cell(device: Device) -> str:
        value = device.get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    return cell


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def runs(device: Device) -> str:
    """What the device runs: base, personal, or the fleet version (and its cluster)."""
    running = device.get("running") or {}
    version, origin = running.get("version"), running.get("origin")
    if version is not None:
        return f"v{version}" + (f" ({device['cluster']})" if device.get("cluster") else "")
    return origin or "base"


def label_free(device: Device) -> str:
    scores = [device.get(k) for k in ("confidence_score", "feature_score")]
    present = [s for s in scores if s is not None]
    return "-" if not present else f"{max(present):.2f}"


COLUMNS: Sequence[Column] = (
    ("DEVICE", lambda d: d["device_id"]),
    ("ONLINE", lambda d: "yes" if d.get("online") else "no"),
    ("LABELS", lambda d: "yes" if d.get("labelled", True) else "no"),
    ("CLUSTER", lambda d: d.get("cluster") or "-"),
    ("RUNS", runs),
    ("ACC BEFORE", _number("accuracy_before", 3)),
    ("ACC AFTER", _number("accuracy_after", 3)),
    ("POWER W", _number("power_w", 2)),
    ("ENERGY J", _number("energy_j", 1)),
    ("DRIFT", label_free),
    ("CLOCK S", _number("clock_offset_s", 1)),  # device minus coordinator clock
    ("LAST SEEN", lambda d: ago(d.get("seen_seconds_ago"))),
    ("WHY", lambda d: (d.get("running") or {}).get("why") or "-"),
)


def format_table(devices: Sequence[dict[str, Any]]) -> str:
    if not devices:
        return "no devices known yet"
    rows = [[header for header, _ in COLUMNS]]
    rows += [[cell(device) for _, cell in COLUMNS] for device in devices]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
