"""The health file: proof of life for a container healthcheck (deploy/agent-healthcheck.sh).

Rewritten when the broker connection comes up and on every heartbeat while connected, so its
age tells a supervisor whether the agent is connected and not stuck, without talking MQTT.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class HealthFile:
    def __init__(self, path: Path | None):
        self.path = path

    def touch(self) -> None:
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(f"{time.time():.0f}\n")
            os.replace(tmp, self.path)  # atomic: a reader never sees a half-written file
        except OSError as error:  # a read-only or missing dir must not stop the agent
            log.warning("cannot write health file %s: %s", self.path, error)
