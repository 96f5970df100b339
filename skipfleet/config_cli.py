"""`skipfleet config show`: the effective configuration of a command, and where each value came
from (default, file:PATH, env:NAME or flag), as a TOML table that can be pasted into a file.

    skipfleet config show --config /etc/skipfleet/skipfleet.toml coordinator --api-port 9000

Flags after the command name are that command's own, merged as the command would merge them
(flag > environment > file > default: shared.config_file). Without a command: all three tables.
This shows the merge only; a value the command itself would refuse (a port out of range, a
device data path that does not exist) is refused when the command starts. Secrets are hidden.
Exit codes: 0, 2 a config file, variable or flag that cannot be used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from shared.config_file import ENV_CONFIG, SECTIONS


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("action", choices=("show",), help="show: print the effective configuration")
    # One catch-all: argparse cannot mix an optional section, --config after it and the
    # command's own flags; _words splits them.
    add(
        "words",
        nargs=argparse.REMAINDER,
        metavar="[--config FILE] [agent|coordinator|simulate] [FLAGS ...]",
        help=f"the TOML config file (default: ${ENV_CONFIG}, else none); whose configuration "
        "(default: all three); that command's own flags, merged as it would merge them",
    )


def main(args: argparse.Namespace) -> int:
    from shared.config_file import EXIT_USAGE, ConfigFileError, resolve, show

    config, section, flags = _words(args.words)
    if flags and not section:
        print("skipfleet config: name the command whose flags these are", file=sys.stderr)
        return EXIT_USAGE
    tables = []
    for name in [section] if section else SECTIONS:
        try:
            namespace = _parse(name, (["--config", config] if config else []) + flags)
            tables.append(show(resolve(namespace, os.environ)))
        except ConfigFileError as err:
            print(f"skipfleet config: {err}", file=sys.stderr)
            return EXIT_USAGE
    path = config or os.environ.get(ENV_CONFIG) or "none"
    print(f"# effective configuration; precedence flag > env > file > default; file: {path}")
    for table in tables:
        print(f"\n{table}")
    return 0


def _words(words: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(--config, the section, the command's flags); argparse exits 2 on a bad section."""
    parser = argparse.ArgumentParser(
        prog="skipfleet config show",
        description="The effective configuration; any further flags are the command's own.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help=f"TOML config file (default: ${ENV_CONFIG}, else none)"
    )
    parser.add_argument(
        "section", nargs="?", choices=SECTIONS, help="whose configuration (default: all three)"
    )
    known, flags = parser.parse_known_args(words)
    return known.config, known.section, flags


def _parse(section: str, argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by the command's own parser (argparse exits 2 on a bad flag)."""
    from skipfleet.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser(prog=f"skipfleet config show {section}")
    importlib.import_module(SUBCOMMANDS[section][0]).configure(parser)
    return parser.parse_args(argv)
