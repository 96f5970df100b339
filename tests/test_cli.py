"""The `skipfleet` command: lazy sub-commands, so a device never imports the coordinator's stack."""

import subprocess
import sys

from skipfleet.cli import SUBCOMMANDS, main
from skipfleet.processes import child_env

PROBE = """
import sys
from skipfleet.cli import main
try:
    main(["agent", "--help"])
except SystemExit:
    pass
HEAVY = ("ray", "prometheus_client", "docker", "yaml", "coordinator")
heavy = [m for m in HEAVY if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


def test_agent_command_imports_no_coordinator_dependencies():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=child_env(), timeout=60, check=True)  # fmt: skip
    assert "HEAVY:\n" in done.stdout, done.stdout[-500:]


def test_help_lists_every_sub_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
