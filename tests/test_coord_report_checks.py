"""A report's checks run in the bridge, before its batch goes to the fleet actor (a round's
bottleneck), on the inbound worker thread: the actor then only compares the shape the arrays
imply with the cohort's, and judges every report exactly as it would have checked it itself."""

from __future__ import annotations

import numpy as np
import pytest

import coordinator.bridge as bridge_module
import coordinator.reports as reports_module
from coordinator.bridge import InboundDecoder
from coordinator.clock import ManualClock
from coordinator.metrics import FleetMetrics
from coordinator.reports import CheckedValues
from shared.protocol import JobKind, encode_envelope
from shared.topics import Topics
from tests.coord_fleet_helpers import finetune_jobs, jobs_in
from tests.test_coord_service import join, start

NAMES = ("pi-1", "pi-2", "pi-3", "pi-4", "pi-5")


def through_the_bridge(received):
    """Decoded as the bridge's network thread does, then checked as its inbound worker does."""
    decoder = InboundDecoder(Topics(), FleetMetrics(), publish_limit=65536)
    topic = f"fleet/{received.device_id}/report"
    decoded = decoder.decode(topic, encode_envelope(received.envelope))
    assert decoded.checked is None  # not on the network thread: a report chooses its shapes
    return bridge_module._checked(decoded)


def judged(tmp_path, decoded: bool) -> dict:
    """Each device's job state and detail after one good report fixed the cohort's shape and
    four bad ones: NaN, beyond the bound only as a product, another shape, incomplete."""
    clock = ManualClock()
    service = start(tmp_path, clock, max_concurrent_jobs=len(NAMES))
    devices = dict(zip(NAMES, join(service, clock, *NAMES), strict=True))
    jobs = finetune_jobs(service)
    good = devices["pi-5"].report(jobs["pi-5"].job_id)
    arrays = good.envelope.message.adapter
    nan = {name: np.full_like(a, np.nan) for name, a in arrays.items()}
    product = {**arrays, "A1": np.full_like(arrays["A1"], 30.0),
               "B1": np.full_like(arrays["B1"], 30.0)}  # fmt: skip
    wrong_shape = {"A1": np.ones((5, 2), np.float32), "B1": np.ones((2, 3), np.float32)}
    incomplete = {k: v for k, v in arrays.items() if k != "B2"}
    bad = {"pi-1": nan, "pi-2": product, "pi-3": wrong_shape, "pi-4": incomplete}
    sent = [good] + [devices[d].report(jobs[d].job_id, arrays=a) for d, a in bad.items()]
    for received in sent:
        service.ingest([through_the_bridge(received) if decoded else received])
    return {j["device_id"]: (j["state"], j["detail"]) for j in service.jobs()}


def test_reports_checked_where_the_bridge_decodes_them_are_judged_as_the_actor_would(tmp_path):
    checked_there = judged(tmp_path / "bridge", decoded=True)
    assert checked_there == judged(tmp_path / "actor", decoded=False)
    assert checked_there["pi-5"][0] == "SUCCEEDED"
    assert {d: s for d, (s, _) in checked_there.items() if d != "pi-5"} == dict.fromkeys(
        ("pi-1", "pi-2", "pi-3", "pi-4"), "FAILED"
    )
    assert "NaN" in checked_there["pi-1"][1] and "ΔW1" in checked_there["pi-2"][1]
    assert "the cohort's is" in checked_there["pi-3"][1]
    assert "missing ['B2']" in checked_there["pi-4"][1]


def test_the_bridge_attaches_its_verdict_and_the_actor_does_not_check_the_values_again(
    tmp_path, monkeypatch
):
    clock = ManualClock()
    service = start(tmp_path, clock)
    (device,) = join(service, clock, "pi-1")
    service.request_finetune(all_=True)
    ((_, job),) = jobs_in(service.tick(), JobKind.FINETUNE)
    decoded = through_the_bridge(device.report(job.job_id))
    assert decoded.checked == CheckedValues(error=None)
    calls = []
    real = reports_module.validate_fit_result
    monkeypatch.setattr(
        reports_module, "validate_fit_result", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    service.ingest([decoded])
    assert calls == [] and service.jobs()[0]["state"] == "SUCCEEDED"


@pytest.mark.parametrize("samples", [0, -3])
def test_a_verdict_names_what_the_actors_own_check_would(samples):
    arrays = {"A1": np.ones((12, 4), np.float32), "B1": np.ones((4, 3), np.float32)}
    verdict = reports_module.check_values("pi-1", arrays, samples)
    with pytest.raises(reports_module.ReportRejected) as own:
        reports_module.check_adapter("pi-1", arrays, samples, expected=None)
    assert verdict == CheckedValues(error=str(own.value))
    assert "sample count must be > 0" in verdict.error


def test_a_check_that_breaks_in_the_bridge_leaves_the_report_to_the_actors_own(monkeypatch):
    arrays = {"A1": np.ones((12, 4), np.float32), "B1": np.ones((4, 3), np.float32)}
    monkeypatch.setattr(reports_module, "infer_shape", lambda *a: 1 / 0)  # a bug, not a verdict
    assert reports_module.check_values("pi-1", arrays, 10) is None
