"""`skipfleet simulate` end to end: the README's main command, on the test session's Ray.

One run through the embedded Python broker (as on a machine without mosquitto), rounds on
request; one through mosquitto with a drift event the coordinator answers by itself.
"""

from __future__ import annotations

import json

import pytest

from skipfleet.cli import main

pytestmark = pytest.mark.slow


def simulate(tmp_path, ray_session, data_dir, *extra: str) -> dict:
    out = tmp_path / "result.json"
    argv = [
        "simulate",
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(tmp_path / "run"),
        "--ray-address",
        ray_session.get_runtime_context().gcs_address,
        "--json",
        str(out),
        "--report",
        str(tmp_path / "report.html"),
        "--timeout",
        "120",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_rounds_on_request_through_the_embedded_python_broker(
    tmp_path, ray_session, data_dir, monkeypatch
):
    monkeypatch.setattr("skipfleet.brokers.find_mosquitto", lambda: None)
    result = simulate(tmp_path, ray_session, data_dir, "--devices", "4", "--dataset", "fan")
    assert result["broker"].startswith("embedded Python broker")
    (round_,) = result["rounds"]
    assert round_["answered"] == 4 and round_["adapter_version"] == 1
    assert round_["outcome"] in ("PROMOTED", "ROLLED_BACK")
    for device in result["per_device"]:
        assert device["finetunes"] == 1 and device["bytes_sent"] > 0
        assert device["accuracy_own"] >= device["accuracy_initial"]
        assert 0.0 <= device["accuracy_fleet"] <= 1.0 and device["joules"] > 0
    noisy = next(d for d in result["per_device"] if "noisy" in d["device"])
    assert noisy["accuracy_initial"] < 0.9 < noisy["accuracy_own"]  # the drifted one recovers
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 3 and noisy["device"] in html


def test_a_drift_event_makes_the_coordinator_fine_tune_by_itself(tmp_path, ray_session, data_dir):
    result = simulate(
        tmp_path, ray_session, data_dir, "--devices", "3", "--dataset", "fan", "--drift-at", "3"
    )
    (round_,) = result["rounds"]
    assert round_["trigger"] in ("drift", "accuracy_below")  # not a request: its own decision
    drifted = [d for d in result["per_device"] if d["description"].count("->")]
    assert drifted, "the scenario must have drifting devices"
    for device in drifted:
        assert device["accuracy_at_start"] > device["accuracy_initial"]  # the drift hurt
        assert device["accuracy_own"] > device["accuracy_initial"]  # and its fine-tune fixed it
        series = [score for _, score in result["drift_series"][device["device"]]]
        assert max(series[-5:]) > min(series[:3]) + 0.3  # the label-free score saw it


def test_a_camera_fleet_fine_tunes_a_cnn_per_rotation_and_rolls_out(
    tmp_path, ray_session, data_dir
):
    """fmnist: three cameras (0°, 30°, 75°) run the CNN; two rounds, the second's reports carry
    the fleet adapter's deltas too (over the 128 KB publish limit: chunked)."""
    result = simulate(
        tmp_path, ray_session, data_dir, "--devices", "3", "--dataset", "fmnist", "--rounds", "2"
    )
    assert [r["answered"] for r in result["rounds"]] == [3, 3]
    assert [r["adapter_version"] for r in result["rounds"]] == [1, 2]
    by_id = {d["device"]: d for d in result["per_device"]}
    assert sorted(by_id) == ["fmnist-r00", "fmnist-r30", "fmnist-r75"]
    for device in by_id.values():
        assert device["finetunes"] == 2 and device["bytes_sent"] > 0
    turned = by_id["fmnist-r75"]
    assert turned["accuracy_initial"] < 0.3 < 0.6 < turned["accuracy_own"]  # its camera's own fix
    assert by_id["fmnist-r30"]["accuracy_own"] > by_id["fmnist-r30"]["accuracy_initial"]
