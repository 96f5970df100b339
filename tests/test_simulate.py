"""`skipfleet simulate` end to end: the README's main command, on the test session's Ray.

One run of a prepared fleet of a task of the user's own (`prepare --from`, `--fleet-dir`) through
the private mosquitto simulate starts itself, rounds on request; one of the fan scenario through a
given mosquitto with a drift event the coordinator answers by itself. Without mosquitto it stops
at once and says how to install it.
"""

from __future__ import annotations

import json
import re
import threading

import pytest

from shared.mqtt import connect_async, make_client, parse_broker_url
from skipfleet import sim_run
from skipfleet.cli import main
from tests.byo_table import write_pump_csv

pytestmark = pytest.mark.slow


def simulate(tmp_path, ray_session, data_dir, *extra: str) -> dict:
    out = tmp_path / "result.json"
    argv = [
        "simulate",
        *(["--data-dir", str(data_dir)] if data_dir else []),
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


def test_without_mosquitto_simulate_stops_at_once_and_says_how_to_install_it(
    tmp_path, data_dir, monkeypatch, capsys
):
    monkeypatch.setattr("skipfleet.brokers.find_mosquitto", lambda: None)
    code = main(["simulate", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "mosquitto is not installed" in err and "apt-get install mosquitto" in err
    assert "--broker" in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing pre-trained


def test_a_prepared_fleet_of_your_own_task_through_its_own_private_mosquitto(tmp_path, ray_session):
    """`prepare --from` a table of pumps (hidden width 16), then `simulate --fleet-dir` on it,
    rounds on request: the agents run that base model, and the pump whose sensor is upside down
    (the base model never saw it) recovers with its fine-tune."""
    table = write_pump_csv(tmp_path / "pumps.csv")
    fleet = tmp_path / "fleet"
    assert main(["prepare", "--from", str(table), "--label-column", "state",
                 "--device-column", "pump", "--holdout-devices", "pump-d,pump-e,pump-f",
                 "--hidden", "16", "--epochs", "10", "--out", str(fleet)]) == 0  # fmt: skip
    result = simulate(tmp_path, ray_session, None, "--fleet-dir", str(fleet), "--max-rounds", "3")
    assert result["broker"].startswith("mosquitto (private")
    assert result["dataset"] == "custom" and result["devices"] == 3
    (run,) = result["runs"]
    assert run["trigger"] == "request" and 1 <= run["rounds"] <= 3
    # requested once every device reports its input signature: clustered, not the whole cohort
    assert "all" not in run["clusters"], run["clusters"].keys()
    for device in result["per_device"]:
        assert device["labelled"] and device["finetunes"] >= 1 and device["bytes_sent"] > 0
        # measured on its own hold-out, a device only ever switches to what measures better
        assert device["accuracy_end"] >= max(device["accuracy_initial"], device["accuracy_own"])
    upside_down = next(d for d in result["per_device"] if d["device"] == "pump-f")
    assert upside_down["accuracy_initial"] < 0.5 and upside_down["accuracy_end"] > 0.9
    html = (tmp_path / "report.html").read_text()
    assert html.count("<canvas") >= 3 and "pump-f" in html


def test_bad_fleet_dirs_and_options_are_refused_before_anything_starts(
    tmp_path, capsys, monkeypatch, data_dir
):
    monkeypatch.setenv("SKIPFLEET_DATA_DIR", str(data_dir))  # exported, as `make` does: no conflict
    table = write_pump_csv(tmp_path / "pumps.csv")
    fleet = tmp_path / "fleet"
    assert main(["prepare", "--from", str(table), "--label-column", "state",
                 "--device-column", "pump", "--epochs", "2", "--out", str(fleet)]) == 0  # fmt: skip
    capsys.readouterr()
    run = ["simulate", "--run-dir", str(tmp_path / "run")]
    assert main([*run, "--fleet-dir", str(fleet), "--dataset", "fan", "--devices", "2"]) == 2
    assert "--fleet-dir brings its devices and data: drop --dataset, --devices" in (
        capsys.readouterr().err
    )
    assert main([*run, "--fleet-dir", str(tmp_path / "nowhere")]) == 1
    assert "is nowhere the --out of skipfleet prepare?" in capsys.readouterr().err.replace(
        str(tmp_path) + "/", ""
    )
    assert main([*run, "--fleet-dir", str(fleet), "--data-dir", str(data_dir)]) == 2
    assert "drop --data-dir" in capsys.readouterr().err  # given for this run: a conflict
    assert main([*run, "--fleet-dir", str(fleet), "--drift-at", "5"]) == 1
    assert "no shard has a drifted stream for --drift-at" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_after_a_drift_a_new_device_without_labels_gets_its_clusters_adapter(
    tmp_path, ray_session, data_dir, mosquitto, monkeypatch
):
    """The coordinator answers the drift by itself, from the label-free score, the drifted
    devices fine-tune together, and a device that joins later without labels recovers with
    what its cluster learned. On a broker it is given (mosquitto): a topic root of its own, and
    no retained message of its left there at the end.

    The measured-accuracy trigger is off here: with both on, which one answers first depends on
    the machine's load, and the test could only accept either."""
    monkeypatch.setitem(sim_run.ACCURACY_THRESHOLD, "fan", "off")
    result = simulate(
        tmp_path, ray_session, data_dir, "--devices", "3", "--dataset", "fan", "--drift-at", "3",
        "--new-devices", "1", "--max-rounds", "4", "--broker", mosquitto.url,
    )  # fmt: skip
    root = result["topic_root"]
    assert re.fullmatch(r"sim-[0-9a-f]{8}", root)
    statuses = {f"{root}/{d['device']}/status" for d in result["per_device"]}
    assert statuses <= set(result["retained_cleared"])  # the agents' presence, at least
    assert retained_on(mosquitto.url, "#") == []
    answered = next(r for r in result["runs"] if r["trigger"] != "request")
    assert answered["trigger"] == "label_free_drift"  # its own decision, without labels
    drifted = [d for d in result["per_device"] if d["description"].count("->")]
    assert drifted, "the scenario must have drifting devices"
    peaks = []
    for device in drifted:
        assert device["accuracy_at_start"] > device["accuracy_initial"]  # the drift hurt
        assert device["accuracy_own"] > device["accuracy_initial"]  # and fine-tuning fixed it
        assert device["accuracy_end"] >= max(device["accuracy_initial"], device["accuracy_own"])
        series = [score for _, score in result["drift_series"][device["device"]]]
        # in distribution before the drift, and again once it runs its new adapter
        assert max(series[:3]) < 1.0 and series[-1] < 1.0
        peaks.append(max(series))
    assert max(peaks) > 1.0  # the calibrated score crossed the base model's own threshold
    (new,) = [d for d in result["per_device"] if not d["labelled"]]
    assert new["runs"].startswith("v") and new["cluster"] is not None
    assert new["accuracy_end"] > new["accuracy_initial"] + 0.1  # it recovers without labels


def retained_on(broker_url: str, pattern: str, quiet_s: float = 1.0) -> list[str]:
    """The topics holding a retained message: a fresh subscriber gets them right after SUBACK."""
    found: list[str] = []
    subscribed = threading.Event()
    client = make_client(parse_broker_url(broker_url), "retained-check")
    client.on_connect = lambda c, *a: c.subscribe(pattern, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: found.append(m.topic) if m.retain else None
    connect_async(client, parse_broker_url(broker_url))
    client.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK"
        threading.Event().wait(quiet_s)
        return found
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_camera_fleet_fine_tunes_a_cnn_per_rotation(tmp_path, ray_session, data_dir):
    """fmnist: three cameras (0°, 30°, 75°) run the CNN through the unchanged agent and
    coordinator; a run on request, each camera ending on what measures best on its hold-out."""
    result = simulate(tmp_path, ray_session, data_dir, "--devices", "3", "--dataset", "fmnist",
                      "--max-rounds", "2")  # fmt: skip
    (run,) = result["runs"]
    assert run["trigger"] == "request" and 1 <= run["rounds"] <= 2
    by_id = {d["device"]: d for d in result["per_device"]}
    assert sorted(by_id) == ["fmnist-r00", "fmnist-r30", "fmnist-r75"]
    for device in by_id.values():
        assert device["labelled"] and device["finetunes"] >= 1 and device["bytes_sent"] > 0
        assert device["accuracy_end"] >= max(device["accuracy_initial"], device["accuracy_own"])
    turned = by_id["fmnist-r75"]
    assert turned["accuracy_initial"] < 0.3 < 0.6 < turned["accuracy_end"]  # its camera recovers
    # Each job's training seed comes from its random id: over 21 runs on this machine (one in
    # CI) the 30° camera ended at 0.53-0.75 from 0.37 (its own fine-tune alone 0.46-0.75), and
    # +0.2 failed once; +0.1 still fails a camera that did not adapt.
    assert by_id["fmnist-r30"]["accuracy_end"] > by_id["fmnist-r30"]["accuracy_initial"] + 0.1
