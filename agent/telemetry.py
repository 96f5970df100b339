"""The heartbeat: power, energy, spool, drift and job state, sent every few seconds (QoS 0).

Before each beat the loop lets the (simulated) sensor observe its next rows, so the drift
scores describe the inputs of the last moments: the BN1 score (`drift_score`), and, when the
base model ships a calibration, the calibrated confidence and feature scores (1.0 = the
calibrated threshold), the feature signature, and which adapter (origin) runs.

Heartbeats go through the spool too, as low-priority telemetry: the first thing dropped when
the spool is full, but a heartbeat made while the broker was away still arrives later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.adapter_store import AdapterStore
from agent.drift import DriftScores, RecentInputs, score_window
from agent.jobs import JobRunner
from agent.learner import Learner
from agent.meters import EnergyMeter, source_label
from agent.spool import Spool
from agent.trainer.errors import AdapterError
from shared.protocol.messages import Heartbeat

log = logging.getLogger(__name__)

THERMAL_ZONE = "sys/class/thermal/thermal_zone0/temp"


@dataclass
class TelemetrySources:
    meter: EnergyMeter
    spool: Spool
    runner: JobRunner
    store: AdapterStore
    learner: Learner
    recent: RecentInputs
    cache_bytes: Callable[[], int]  # Skip-Cache bytes of the last fine-tune
    drifted: Callable[[], bool] = lambda: False  # switched to the drifted data (simulation)
    clock_offset: Callable[[], float | None] = lambda: None  # device minus coordinator clock


class Telemetry:
    def __init__(
        self,
        sources: TelemetrySources,
        *,
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
    ):
        self._s = sources
        self._root = root
        self._clock = clock
        self._started = clock()
        self._last = (self._started, sources.meter.read_joules())

    def heartbeat(self) -> Heartbeat:
        s = self._s
        now, joules = self._clock(), s.meter.read_joules()
        then, joules_then = self._last
        self._last = (now, joules)
        stats = s.spool.stats()
        current = s.store.current
        scores = self.drift_scores()
        signature = None if scores is None else scores.signature
        return Heartbeat(
            power_w=max(0.0, (joules - joules_then) / (now - then)) if now > then else 0.0,
            power_source=source_label(s.meter),
            energy_j_total=joules,
            cache_bytes=s.cache_bytes(),
            spool_depth=stats.depth,
            spool_dropped=stats.dropped_telemetry + stats.refused_records,
            uptime_s=now - self._started,
            temperature_c=read_temperature(self._root),
            drift_score=None if scores is None else scores.bn1_mean_squared_z,
            adapter_version=current.meta.version if current else None,
            busy_job_id=s.runner.busy_job_id,
            drifted=s.drifted(),
            confidence_score=None if scores is None else scores.confidence_score,
            feature_score=None if scores is None else scores.feature_score,
            signature=signature,
            signature_rows=None if signature is None else scores.rows,
            adapter_origin=s.store.origin,
            clock_offset_s=s.clock_offset(),
        )

    def drift_scores(self) -> DriftScores | None:
        """The scores of the recent inputs (None before any), with the running adapter."""
        s = self._s
        rows = s.recent.snapshot()
        if len(rows) == 0:
            return None
        current = s.store.current
        try:
            adapter = s.learner.adapter(current.arrays if current else None)
        except AdapterError:
            adapter = None
        scores = score_window(s.learner.model, rows, adapter)
        if len(rows) < s.recent.capacity:
            # The thresholds were calibrated on full windows: a score over fewer rows (after a
            # start) is noisier than they allow for, and would start runs on a blip.
            scores = replace(scores, confidence_score=None, feature_score=None, signature=None)
        log.debug(
            "drift: bn1 z² %.3f, entropy %.3f, confidence %.4f (score %s), feature score %s "
            "over %d rows",
            scores.bn1_mean_squared_z,
            scores.prediction_entropy,
            scores.confidence,
            _fmt(scores.confidence_score),
            _fmt(scores.feature_score),
            scores.rows,
        )
        return scores


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def read_temperature(root: Path) -> float | None:
    """The SoC temperature in °C from the first thermal zone, if the board has one."""
    try:
        return int((root / THERMAL_ZONE).read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


class HeartbeatLoop:
    """Sends a heartbeat every `interval` seconds on its own thread until stopped."""

    def __init__(
        self,
        telemetry: Telemetry,
        send: Callable[[Heartbeat], None],
        interval: float,
        observe: Callable[[], None] = lambda: None,
        after_beat: Callable[[], None] = lambda: None,
    ):
        self._telemetry = telemetry
        self._send = send
        self._interval = interval
        self._observe = observe
        self._after_beat = after_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            try:
                self._observe()
            except Exception:  # the beat still goes out, with the window as it was
                log.exception("sensor stream failed")
            try:
                self._send(self._telemetry.heartbeat())
                self._after_beat()
            except Exception:  # one bad beat must not end the heartbeats
                log.exception("heartbeat failed")
            if self._stop.wait(self._interval):
                return
