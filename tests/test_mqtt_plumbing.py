"""shared.mqtt: broker URLs, settings, client construction, v5 properties, backoff, sizes; and a
real round trip through a private mosquitto."""

from __future__ import annotations

import queue
import random
import ssl
import threading

import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.mqtt import (
    CONTENT_TYPE,
    MqttProtocol,
    MqttSettings,
    PublishTooLarge,
    Will,
    backoff_delay,
    check_publish_size,
    connect_async,
    describe_connect_error,
    jittered_reconnect_delays,
    make_client,
    packed_publish_properties,
    parse_broker_url,
    publish_properties,
)
from shared.protocol import (
    FetchRequest,
    Presence,
    PresenceState,
    decode,
    encode_envelope,
    new_envelope,
)
from shared.topics import TopicKind, Topics
from tests.protocol_samples import BASE_HASH


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", dict(host="broker", port=1883, tls=False, username=None)),
        ("mqtts://broker.example.org", dict(host="broker.example.org", port=8883, tls=True)),
        ("mqtt://10.0.0.5:1884/", dict(host="10.0.0.5", port=1884)),
        ("mqtt://[::1]:1885", dict(host="::1", port=1885)),
        ("mqtt://pi-07@h", dict(username="pi-07", password=None)),
        ("mqtts://pi-07:s%40cret%3A@h:8884", dict(username="pi-07", password="s@cret:", port=8884)),
    ],
)
def test_broker_urls(url, expected):
    settings = parse_broker_url(url)
    for name, value in expected.items():
        assert getattr(settings, name) == value, name


@pytest.mark.parametrize(
    "url",
    [
        "http://broker",
        "broker:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:99999",
        "mqtt://h:port",
        "mqtt://h/fleet",
        "mqtt://h?tls=1",
        "mqtt://h#x",
        "mqtt://:pw@h",
        "",
    ],
)
def test_bad_broker_urls_are_clear_value_errors(url):
    with pytest.raises(ValueError):
        parse_broker_url(url)


def test_overrides_and_settings_validation():
    url = "mqtt://u:hunter2@h"
    settings = parse_broker_url(url, protocol="3.1.1", session_expiry_s=3600)
    assert settings.protocol is MqttProtocol.V311 and settings.persistent_session
    assert settings.password == "hunter2" and "hunter2" not in repr(settings)
    assert settings.url == "mqtt://h:1883" and parse_broker_url("mqtt://[::1]").url.startswith(
        "mqtt://[::1]"
    )
    for bad in (
        dict(port=0),
        dict(host=""),
        dict(reconnect_min_delay_s=10, reconnect_max_delay_s=5),
        dict(protocol="4"),
        dict(keepalive_s=0),
    ):
        with pytest.raises(ValueError):
            MqttSettings(**{"host": "h", **bad})


def test_reconnect_delays_are_jittered_within_bounds():
    settings = MqttSettings("h", reconnect_min_delay_s=2, reconnect_max_delay_s=40)
    rng = random.Random(1)
    draws = {jittered_reconnect_delays(settings, rng) for _ in range(200)}
    assert all(2 <= low <= 4 and 30 <= high <= 40 and low <= high for low, high in draws)
    assert len(draws) > 10
    tight = MqttSettings("h", reconnect_min_delay_s=3, reconnect_max_delay_s=3)
    assert jittered_reconnect_delays(tight) == (3, 3)


def test_make_client_v5_with_will_and_credentials():
    settings = parse_broker_url("mqtt://dev:pw@127.0.0.1:1")
    will = Will("fleet/pi-1/status", b"offline", delay_s=10)
    client = make_client(settings, "pi-1", will=will)
    assert client.protocol is MQTTProtocolVersion.MQTTv5
    assert client.username == "dev"
    assert (client.will_topic, client.will_payload) == ("fleet/pi-1/status", b"offline")
    connect_async(client, settings)  # only records the target; the loop would connect
    assert (client.host, client.port) == ("127.0.0.1", 1)


def test_make_client_v311():
    settings = MqttSettings("h", protocol=MqttProtocol.V311, session_expiry_s=60)
    client = make_client(settings, "pi-1", will=Will("t", b"x", delay_s=5))
    assert client.protocol is MQTTProtocolVersion.MQTTv311
    connect_async(client, settings)
    with pytest.raises(ValueError):
        make_client(settings, "")


def test_publish_properties_mirror_the_envelope():
    request = new_envelope(
        FetchRequest(3),
        sender="pi-1",
        boot_id="b",
        seq=1,
        expires_at=1000.2,
        reply_to="fleet/pi-1/cmd/adapter",
    )
    props = publish_properties(request, now=990.0)
    assert props.MessageExpiryInterval == 11
    assert props.ResponseTopic == "fleet/pi-1/cmd/adapter"
    assert props.CorrelationData == request.message_id.encode()
    assert ("schema", "1") in props.UserProperty and ("kind", "fetch") in props.UserProperty
    assert props.ContentType == CONTENT_TYPE
    answer = new_envelope(FetchRequest(3), sender="c", boot_id="b", seq=2, correlation_id="abc")
    answer_props = publish_properties(answer, now=0)
    assert answer_props.CorrelationData == b"abc"
    assert not hasattr(answer_props, "MessageExpiryInterval")
    stale = new_envelope(FetchRequest(3), sender="c", boot_id="b", seq=3, expires_at=5.0)
    assert publish_properties(stale, now=100.0).MessageExpiryInterval == 1


def unpacked(packed: bytes) -> dict:
    props = Properties(PacketTypes.PUBLISH)
    props.unpack(packed)
    return props.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"expires_at": 1000.2},
        {"expires_at": 5.0},  # already expired: still 1 s, as paho's would be
        {"expires_at": 1000.2, "reply_to": "fleet/pi-1/cmd/adapter"},
        {"correlation_id": "abc"},
    ],
)
def test_packed_publish_properties_are_the_same_properties_on_the_wire(headers):
    envelope = new_envelope(FetchRequest(3), sender="pi-1", boot_id="b", seq=1, **headers)
    packed = packed_publish_properties(envelope, now=990.0)
    assert unpacked(packed.pack()) == unpacked(publish_properties(envelope, now=990.0).pack())
    assert "PackedProperties(" in str(packed)  # paho's debug log can print it


def test_a_far_expiry_is_capped_at_what_the_property_holds():
    envelope = new_envelope(FetchRequest(3), sender="c", boot_id="b", seq=1, expires_at=1e12)
    assert (
        unpacked(packed_publish_properties(envelope, now=0).pack())["MessageExpiryInterval"]
        == 2**32 - 1
    )


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(0)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delay = backoff_delay(attempt, base_s=0.5, cap_s=30.0, rng=rng)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(10_000, cap_s=5.0) <= 5.0
    with pytest.raises(ValueError):
        backoff_delay(-1)


def test_publish_size_check():
    assert check_publish_size(b"x" * 10, 10) == 10
    with pytest.raises(PublishTooLarge, match="11 bytes"):
        check_publish_size(b"x" * 11, 10)


def _connected_client(settings, client_id, on_message=None, subscribe=()):
    """A started client; subscriptions happen in on_connect so they survive reconnects."""
    ready = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        for topic_filter, qos in subscribe:
            client.subscribe(topic_filter, qos=qos)
        ready.set()

    client = make_client(settings, client_id)
    client.on_connect = on_connect
    client.on_message = on_message
    connect_async(client, settings)
    client.loop_start()
    assert ready.wait(5), f"{client_id} did not connect"
    return client


def _presence_envelope():
    presence = Presence(PresenceState.ONLINE, "boot-1", "0.1.0", BASE_HASH, "fan-a")
    return new_envelope(presence, sender="pi-1", boot_id="boot-1", seq=0)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", list(MqttProtocol))
def test_retained_presence_reaches_a_later_subscriber(mosquitto, protocol):
    settings = parse_broker_url(mosquitto.url, protocol=protocol)
    topics = Topics()
    envelope = _presence_envelope()
    v5 = protocol is MqttProtocol.V5
    device = _connected_client(settings, "pi-1")
    received: queue.Queue = queue.Queue()
    coordinator = None
    try:
        info = device.publish(
            topics.status("pi-1"),
            encode_envelope(envelope),
            qos=TopicKind.STATUS.qos,
            retain=TopicKind.STATUS.retained,
            properties=publish_properties(envelope) if v5 else None,
        )
        info.wait_for_publish(5)
        assert info.is_published()
        subscriptions = topics.coordinator_subscriptions()
        coordinator = _connected_client(
            settings, "coordinator", lambda c, u, msg: received.put(msg), subscriptions
        )
        message = received.get(timeout=5)
    finally:
        for client in (device, coordinator):
            if client is not None:
                client.disconnect()
                client.loop_stop()
    assert message.retain
    assert topics.parse(message.topic) == ("pi-1", TopicKind.STATUS)
    decoded = decode(message.payload)
    assert decoded.message == envelope.message and decoded.message_id == envelope.message_id
    if v5:
        assert ("schema", "1") in message.properties.UserProperty


@pytest.mark.slow
def test_retained_state_survives_a_graceful_broker_restart(mosquitto):
    settings = parse_broker_url(mosquitto.url)
    topic = Topics().status("pi-1")
    payload = encode_envelope(_presence_envelope())
    device = _connected_client(settings, "pi-1")
    device.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    device.disconnect()
    device.loop_stop()
    port = mosquitto.port
    mosquitto.stop()
    mosquitto.start()
    assert mosquitto.port == port and mosquitto.url.endswith(f":{port}")
    received: queue.Queue = queue.Queue()
    reader = _connected_client(settings, "reader", lambda c, u, m: received.put(m), [(topic, 1)])
    try:
        assert received.get(timeout=5).payload == payload
    finally:
        reader.disconnect()
        reader.loop_stop()


def test_a_tls_reason_ending_in_a_period_is_not_doubled_before_what_to_check():
    err = ssl.SSLCertVerificationError("certificate verify failed")
    err.verify_message = "IP address mismatch, certificate is not valid for '127.0.0.1'."
    said = describe_connect_error(err, MqttSettings("127.0.0.1", 8883, tls=True))
    assert "not valid for '127.0.0.1'. Check that --tls-ca" in said and ".." not in said
