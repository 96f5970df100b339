"""skipfleet.retained: a run removes the retained messages under its own topic root, and only
those (a real mosquitto)."""

from __future__ import annotations

import pytest

from shared.mqtt import make_client, parse_broker_url
from skipfleet.retained import clear_retained
from tests.test_simulate import retained_on


def publish_retained(broker_url: str, topics: list[str]) -> None:
    client = make_client(parse_broker_url(broker_url), "seeder")
    client.connect("127.0.0.1", int(broker_url.rsplit(":", 1)[1]))
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, b"state", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_only_the_runs_own_retained_messages_are_removed(mosquitto):
    ours = ["sim-1234abcd/dev-a/status", "sim-1234abcd/dev-a/cmd/desired"]
    theirs = ["fleet/dev-a/status", "sim-99999999/dev-b/status"]
    publish_retained(mosquitto.url, ours + theirs)
    cleared = clear_retained(parse_broker_url(mosquitto.url), "sim-1234abcd", "cleanup")
    assert sorted(cleared) == sorted(ours)
    assert sorted(retained_on(mosquitto.url, "#")) == sorted(theirs)
    assert clear_retained(parse_broker_url(mosquitto.url), "sim-1234abcd", "cleanup") == []


@pytest.mark.parametrize("root", ["", "#", "a/b", "+"])
def test_a_root_that_is_not_one_plain_level_is_refused(mosquitto, root):
    with pytest.raises(ValueError, match="one plain topic level"):
        clear_retained(parse_broker_url(mosquitto.url), root, "cleanup")
