"""Drive a running fleet: list its devices, scale it, and inject faults.

Two backends share one interface (`skipfleet.fleet.base.Fleet`): `ProcessFleet` runs agents as
child processes behind per-device TCP proxies (what the tests and `simulate` use), `DockerFleet`
drives the docker compose project. `skipfleet fleet` (skipfleet.fleet.cli) talks to either:
a process fleet through its HTTP control endpoint, the compose project through the Docker SDK.

Nothing is imported here, so `skipfleet --help` stays light.
"""
