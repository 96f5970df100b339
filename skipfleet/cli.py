"""The `skipfleet` console command.

Each sub-command lives in its own module exposing `configure(parser)` and `main(args) -> int`.
Modules are imported only when their sub-command runs, so `skipfleet agent` on a Pi never
imports Ray or prometheus-client.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("skipfleet.bench", "run a benchmark and print its figures"),
    "agent": ("agent.cli", "run the device agent (one device)"),
    "coordinator": ("coordinator.cli", "run the fleet coordinator (Ray, MQTT, API, metrics)"),
    "status": ("coordinator.status_cli", "print the fleet as a table from the coordinator's API"),
    "simulate": ("skipfleet.simulate", "run a simulated fleet end to end on this machine"),
    "fleet": ("skipfleet.fleet", "drive a running fleet: list devices, scale, inject faults"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module.rsplit(".", 1)[0]) is not None and (
        importlib.util.find_spec(module) is not None
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skipfleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if not _available(module):
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).configure(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything loads NumPy: the trainer's small products are fastest on one BLAS thread.
    from agent.trainer.blas import set_thread_env

    set_thread_env(os.environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
