"""The start-up steps of the agent, each turning its failure into the right fatal error."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.errors import ConfigError, StateDirUnusable
from agent.learner import load_base_model
from agent.local_data import LocalData, load_local_data
from agent.meters import EnergyMeter, source_label
from agent.power import detect
from agent.spool import Spool, SpoolFull
from agent.uplink import Uplink
from shared.protocol.enums import PresenceState
from shared.protocol.messages import JobStatus, Presence

log = logging.getLogger(__name__)


def agent_version() -> str:
    try:
        return importlib.metadata.version("skipfleet")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0+source"


def prepare_state_dir(path: Path) -> Path:
    """Create the state dir and prove it is writable now, not at the first job."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise StateDirUnusable(f"state dir {path} is not writable: {err.strerror}") from None
    return path


def load_data(config: AgentConfig) -> LocalData:
    """The base model and the device data split; BaseModelUnusable or DataUnusable if not."""
    model = load_base_model(config.base_model_path)
    data = load_local_data(config.data_path, model, config.holdout_fraction, config.seed)
    if config.drift_at_seconds is not None and not data.can_drift:
        raise ConfigError(
            f"invalid configuration: --drift-at needs drifted rows (X_drift, y_drift) in the "
            f"device data {config.data_path}, which has none"
        )
    learner = data.current().learner
    log.info(
        "device %s: %d training rows, %d hold-out rows%s, base model %s",
        config.device_id,
        len(learner.train),
        len(learner.holdout),
        ", drifted rows for a simulated drift event" if data.can_drift else "",
        model.weights_hash[:12],
    )
    if not learner.labelled:
        log.warning(
            "device %s has no labels: it streams drift scores and runs the adapters it is "
            "given, but rejects fine-tune and evaluate jobs",
            config.device_id,
        )
    if model.calibration is None:
        log.warning(
            "base model %s carries no drift calibration (made before calibrations existed): "
            "heartbeats carry no confidence_score, feature_score or signature",
            config.base_model_path,
        )
    return data


def open_spool(state_dir: Path, max_messages: int) -> Spool:
    try:
        return Spool(state_dir / "spool.sqlite", max_messages=max_messages)
    except sqlite3.Error as err:
        raise StateDirUnusable(f"spool in {state_dir} unusable: {err}") from None


def detect_meter(config: AgentConfig) -> EnergyMeter:
    detection = detect(ina219=config.ina219, profile=config.power_profile)
    for note in detection.notes:
        log.info("power: %s", note)
    log.info("power: using %s", detection.meter.description)
    return detection.meter


# Publishes one payload now, not durably (paho keeps a QoS 1 message in memory until PUBACK).
DirectPublish = Callable[[str, bytes, int], object]


def status_sender(
    uplink: Uplink, direct: DirectPublish | None = None
) -> Callable[[JobStatus], None]:
    """The job runner's way out: spool the status. A spool full of records, or a disk that
    takes no write (SQLite: "database or disk is full"), sends it straight to paho instead,
    so a job that failed `disk_full` still says so; only without `direct` is it lost."""

    def send(status: JobStatus) -> None:
        try:
            uplink.send(status)
        except (SpoolFull, sqlite3.Error, OSError) as err:
            if direct is None:
                log.error("job %s status %s not sent: %s", status.job_id, status.state, err)
                return
            log.warning("job %s status %s not spooled (%s): sent directly", status.job_id,
                        status.state, err)  # fmt: skip
            topic, kind = uplink.topic_for(status)
            for outgoing in uplink.encode(status):
                direct(topic, outgoing.payload, kind.qos)

    return send


class PresenceFactory:
    """Retained presence payloads, stamped with (boot id, seq) like every device message.

    They say how many labelled rows the device trains on and holds out (0 and 0: no labels),
    as its current data phase has them when the payload is made (at every connect).
    """

    def __init__(self, config: AgentConfig, data: LocalData, meter: EnergyMeter, uplink: Uplink):
        self._cohort = config.cohort
        self._data = data
        self._meter = meter
        self._uplink = uplink

    def __call__(self, state: PresenceState) -> bytes:
        device = {
            "hostname": socket.gethostname()[:64],
            "arch": platform.machine(),
            "cpus": os.cpu_count() or 1,
            "power_source": source_label(self._meter),
            "sent_at": time.time(),
        }
        learner = self._data.current().learner
        message = Presence(
            state,
            self._uplink.boot_id,
            agent_version(),
            self._data.model.weights_hash,
            self._cohort,
            device,
            train_samples=len(learner.train),
            holdout_samples=len(learner.holdout),
        )
        (item,) = self._uplink.encode(message)
        return item.payload
