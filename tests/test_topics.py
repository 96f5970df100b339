"""Topic names: exactly the table of docs/architecture.md, and a parser that refuses strangers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.topics import DOWNLINK, UPLINK, TopicKind, Topics, validate_device_id
from tests.import_check import foreign_imports

REPO = Path(__file__).resolve().parent.parent
TABLE = {  # docs/architecture.md: suffix -> (retained, QoS, from device)
    "status": (True, 1, True),
    "telemetry": (False, 0, True),
    "job": (False, 1, True),
    "report": (False, 1, True),
    "fetch": (False, 1, True),
    "cmd/job": (False, 1, False),
    "cmd/adapter": (False, 1, False),
    "cmd/desired": (True, 1, False),
}


def test_kinds_match_the_architecture_table():
    assert {k.value for k in TopicKind} == set(TABLE)
    for kind in TopicKind:
        assert (kind.retained, kind.qos, kind.from_device) == TABLE[kind.value]
    assert set(TopicKind) == UPLINK | DOWNLINK and not UPLINK & DOWNLINK


def test_builders_use_root_and_device_as_whole_levels():
    topics = Topics()
    assert topics.status("pi-07") == "fleet/pi-07/status"
    assert topics.telemetry("pi-07") == "fleet/pi-07/telemetry"
    assert topics.job("pi-07") == "fleet/pi-07/job"
    assert topics.report("pi-07") == "fleet/pi-07/report"
    assert topics.fetch("pi-07") == "fleet/pi-07/fetch"
    assert topics.cmd_job("pi-07") == "fleet/pi-07/cmd/job"
    assert topics.cmd_adapter("pi-07") == "fleet/pi-07/cmd/adapter"
    assert Topics("site-a/lab").cmd_desired("x") == "site-a/lab/x/cmd/desired"


def test_subscriptions():
    topics = Topics("f")
    assert topics.all_devices(TopicKind.STATUS) == "f/+/status"
    assert topics.coordinator_subscriptions() == [
        ("f/+/status", 1),
        ("f/+/telemetry", 0),
        ("f/+/job", 1),
        ("f/+/report", 1),
        ("f/+/fetch", 1),
    ]
    assert topics.device_subscriptions("d1") == [
        ("f/d1/cmd/job", 1),
        ("f/d1/cmd/adapter", 1),
        ("f/d1/cmd/desired", 1),
    ]


@pytest.mark.parametrize("device_id", ["", "Pi", "a/b", "+", "#", "a b", "x" * 65, "é", None, 7])
def test_invalid_device_ids_are_refused(device_id):
    with pytest.raises(ValueError, match="invalid device id"):
        validate_device_id(device_id)
    with pytest.raises(ValueError):
        Topics().status(device_id)


@pytest.mark.parametrize("root", ["", "/fleet", "fleet/", "a//b", "fleet/+", "#", "$SYS", 3])
def test_invalid_roots_are_refused(root):
    with pytest.raises(ValueError, match="invalid topic root"):
        Topics(root)


def test_topics_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Topics().root = "other"


def test_parse_round_trips_every_kind():
    topics = Topics("site/fleet")
    for kind in TopicKind:
        assert topics.parse(topics.topic("dev-1", kind)) == ("dev-1", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "other/pi-1/status",
        "fleetx/pi-1/status",
        "fleet/pi-1/unknown",
        "fleet/pi-1/cmd",
        "fleet/pi-1/cmd/job/extra",
        "fleet/pi-1",
        "fleet//status",
        "fleet/PI-1/status",
        "fleet/+/status",
        "fleet/a/b/status",
        "fleet",
    ],
)
def test_parse_rejects_foreign_topics(topic):
    with pytest.raises(ValueError):
        Topics().parse(topic)


def test_shared_imports_only_its_allowed_dependencies():
    """`shared` is the bottom of the import graph: stdlib, numpy, msgpack, paho-mqtt only."""
    allowed = {"shared", "numpy", "msgpack", "paho"}
    assert foreign_imports(["shared.topics", "shared.protocol", "shared.mqtt"], allowed) == []
