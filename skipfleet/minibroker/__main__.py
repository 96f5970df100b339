"""`python -m skipfleet.minibroker --host 127.0.0.1 --port 1883`: run the broker in the foreground
until SIGINT or SIGTERM. Prints `listening on HOST:PORT` once clients can connect."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from skipfleet.minibroker.config import DEFAULT_MAX_PACKET_SIZE, BrokerConfig
from skipfleet.minibroker.server import serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skipfleet.minibroker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port; 0 picks a free one")
    parser.add_argument(
        "--max-packet-size",
        type=int,
        default=DEFAULT_MAX_PACKET_SIZE,
        help="bytes; a client sending a larger packet is disconnected",
    )
    parser.add_argument(
        "--users-file",
        type=Path,
        help="lines of `user:password` (# comments); without it anyone may connect",
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING...")
    return parser.parse_args(argv)


def read_users(path: Path) -> dict[str, str]:
    users = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise SystemExit(f"{path}:{number}: expected `user:password`")
        users[user] = password
    return users


async def run(args: argparse.Namespace) -> None:
    users = read_users(args.users_file) if args.users_file else None
    config = BrokerConfig(max_packet_size=args.max_packet_size, users=users)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce(_broker: object, port: int) -> None:
        print(f"listening on {args.host}:{port}", flush=True)

    await serve(args.host, args.port, config, stop=stop, on_listening=announce)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run(args))
    except OSError as error:
        print(f"minibroker: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
