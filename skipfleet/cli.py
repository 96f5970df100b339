"""The `skipfleet` console command.

Each sub-command lives in its own module exposing `configure(parser)` and `main(args) -> int`.
A module is imported only when its sub-command runs, so `skipfleet agent` on a Pi never
imports Ray or prometheus-client.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("skipfleet.bench", "run a benchmark and print its figures"),
    "agent": ("agent.cli", "run the device agent (one device)"),
    "coordinator": ("coordinator.cli", "run the fleet coordinator (Ray, MQTT, API, metrics)"),
    "status": ("coordinator.status_cli", "print the fleet as a table from the coordinator's API"),
    "simulate": ("skipfleet.simulate", "run a simulated fleet end to end on this machine"),
    "prepare": ("skipfleet.prepare", "write a fleet's base model and device data shards"),
    "fleet": ("skipfleet.fleet.cli", "drive a running fleet: list devices, scale, inject faults"),
    "config": ("skipfleet.config_cli", "show the effective configuration and each value's source"),
}


def _chosen(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def version() -> str:
    """The installed distribution's version (pyproject.toml); a source tree that was never
    installed says so rather than inventing one."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("skipfleet")
    except PackageNotFoundError:
        return "(not installed: run pip install -e . in the checkout)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the chosen sub-command's module is imported: on a Pi, `skipfleet agent` must never
    import the coordinator's dependencies (Ray, prometheus-client, docker)."""
    parser = argparse.ArgumentParser(prog="skipfleet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).configure(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything loads NumPy: the trainer's small products are fastest on one BLAS thread.
    from agent.trainer.blas import set_thread_env

    set_thread_env(os.environ)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
