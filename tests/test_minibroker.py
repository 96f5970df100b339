"""skipfleet.minibroker: the embedded broker, driven by real paho-mqtt 2.x clients over MQTT 5
and 3.1.1 (plus raw sockets for what paho will not send), and its codec and routing in isolation.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from skipfleet.minibroker import BrokerConfig, MiniBroker
from skipfleet.minibroker.codes import PacketError, ProtocolLevel, ReasonCode
from skipfleet.minibroker.message import Delivery, Message
from skipfleet.minibroker.packets import SubscriptionOptions
from skipfleet.minibroker.protocol import decode_packet, find_frame
from skipfleet.minibroker.router import RetainedStore, SubscriptionTree
from skipfleet.minibroker.sessions import QueueLimits, Session
from skipfleet.minibroker.topics import filter_matches, is_valid_filter
from skipfleet.minibroker.wire import Reader, encode_varint
from tests.minibroker_helpers import (
    V5,
    V311,
    Peer,
    RawClient,
    Swarm,
    connect_packet,
    puback_packet,
    subscribe_packet,
    wait_until,
)

PROTOCOLS = pytest.mark.parametrize("protocol", [V5, V311], ids=["v5", "v311"])


@pytest.fixture
def broker():
    with MiniBroker() as running:
        yield running


@pytest.fixture
def make_broker():
    """Brokers with their own settings, stopped after the test's peers have disconnected."""
    started: list[MiniBroker] = []

    def make(**kwargs) -> MiniBroker:
        started.append(MiniBroker(**kwargs).start())
        return started[-1]

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def peers():
    """Peers made by a test are disconnected afterwards even if it fails."""
    made: list[Peer] = []
    yield made
    for made_peer in made:
        made_peer.client.disconnect()  # wakes paho's loop thread, which then ends at once
        made_peer.client.loop_stop()


def peer(peers, broker, client_id, protocol=V5, **kwargs) -> Peer:
    made = Peer(broker.port, client_id, protocol, **kwargs)
    peers.append(made)
    return made


def wait_offline(broker, client_id: str) -> None:
    """paho reports a disconnect once it sent DISCONNECT; wait for the broker to have read it."""

    def offline(core) -> bool:
        session = core.sessions.get(client_id)
        return session is None or session.connection is None

    wait_until(lambda: broker.call(offline), what=f"{client_id} offline")


def watcher(peers, broker, topic_filter: str) -> Peer:
    watching = peer(peers, broker, "watcher").connect()
    watching.subscribe(topic_filter)
    return watching


def barrier(peers, broker, watching: Peer, topic: str) -> None:
    """Everything the broker routed to `watching` before now has arrived once this returns:
    one connection's deliveries arrive in order, and the marker is routed last."""
    count = len(watching.messages)
    marker = peer(peers, broker, f"marker-{count}").connect()
    marker.publish(topic, b"marker")
    wait_until(lambda: b"marker" in [m.payload for m in watching.messages[count:]])


# ---- publish / subscribe ---------------------------------------------------------------------


@PROTOCOLS
def test_round_trip_at_qos_0_and_1(broker, peers, protocol):
    subscriber = peer(peers, broker, "sub", protocol).connect()
    assert subscriber.subscribe("fleet/dev-1/telemetry", qos=1) == [1]
    publisher = peer(peers, broker, "pub", protocol).connect()
    assert publisher.publish("fleet/dev-1/telemetry", b"one", qos=1) == 0
    publisher.publish("fleet/dev-1/telemetry", b"zero", qos=0)
    first, second = subscriber.wait_messages(2)
    assert (first.payload, first.qos, first.retain) == (b"one", 1, False)
    assert (second.payload, second.qos) == (b"zero", 0)


def test_granted_qos_is_capped_at_1_and_qos_2_publishes_complete(broker, peers):
    subscriber = peer(peers, broker, "sub").connect()
    assert subscriber.subscribe("q/#", qos=2) == [1]
    publisher = peer(peers, broker, "pub").connect()
    assert publisher.publish("q/2", b"exactly once", qos=2) == 0  # PUBREC, PUBREL, PUBCOMP done
    (received,) = subscriber.wait_messages(1)
    assert received.qos == 1


@PROTOCOLS
def test_wildcards_and_dollar_topics(broker, peers, protocol):
    subscriber = peer(peers, broker, "sub", protocol).connect()
    subscriber.subscribe("fleet/+/status")
    subscriber.subscribe("fleet/dev-2/#")
    subscriber.subscribe("#")
    publisher = peer(peers, broker, "pub", protocol).connect()
    for topic in ("fleet/dev-1/status", "fleet/dev-2/status", "$SYS/load", "other"):
        publisher.publish(topic, b"x")
    wait_until(lambda: len(subscriber.messages) >= 3)
    barrier(peers, broker, subscriber, "end")
    # Overlapping filters deliver once per message; `#` does not match `$SYS/...`.
    assert subscriber.topics() == ["fleet/dev-1/status", "fleet/dev-2/status", "other", "end"]


@PROTOCOLS
def test_retained_delivery_and_deletion(broker, peers, protocol):
    publisher = peer(peers, broker, "pub", protocol).connect()
    publisher.publish("fleet/dev-1/status", b"online", retain=True)
    publisher.publish("fleet/dev-2/status", b"online", retain=True)
    publisher.publish("fleet/dev-2/status", b"", retain=True)  # an empty payload deletes
    late = peer(peers, broker, "late", protocol).connect()
    late.subscribe("fleet/+/status")
    (retained,) = late.wait_messages(1)
    assert (retained.topic, retained.payload, retained.retain) == (
        "fleet/dev-1/status",
        b"online",
        True,
    )
    publisher.publish("fleet/dev-1/status", b"offline", retain=True)
    live = late.wait_messages(2)[1]
    assert (live.payload, live.retain) == (b"offline", False)  # cleared on normal forwarding
    barrier(peers, broker, late, "fleet/x/status")
    assert [m.payload for m in late.messages] == [b"online", b"offline", b"marker"]


@pytest.mark.parametrize("level", [4, 5])
def test_bad_and_shared_filters_are_refused_in_suback(broker, level):
    # paho refuses to send a bad filter, so raw bytes it is.
    raw = RawClient(broker.port)
    raw.send(connect_packet("raw", level=level))
    raw.read_packet()
    codes = []
    for packet_id, topic_filter in enumerate(["a/#/b", "$share/group/t", "ok/+"], start=1):
        raw.send(subscribe_packet(packet_id, topic_filter, 1, level=level))
        first, body = raw.read_packet()
        assert first == 0x90 and body[:2] == packet_id.to_bytes(2, "big")
        codes.append(body[-1])
    raw.close()
    if level == 5:
        invalid, shared = (
            ReasonCode.TOPIC_FILTER_INVALID,
            ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
        )
        assert codes == [invalid, shared, 1]
    else:
        assert codes == [0x80, 0x80, 1]  # 3.1.1 has a single failure code


def test_retain_as_published_and_no_local(broker, peers):
    client = peer(peers, broker, "both").connect()
    _, mid = client.client.subscribe(
        "rap/#", options=SubscribeOptions(qos=1, retainAsPublished=True)
    )
    wait_until(lambda: mid in client.subacks)
    _, mid = client.client.subscribe("nl/#", options=SubscribeOptions(qos=1, noLocal=True))
    wait_until(lambda: mid in client.subacks)
    client.publish("nl/own", b"not to myself")
    client.publish("rap/x", b"kept flag", retain=True)
    (received,) = client.wait_messages(1)
    assert (received.topic, received.retain) == ("rap/x", True)


def test_puback_reason_codes_v5(broker, peers):
    publisher = peer(peers, broker, "pub").connect()
    assert publisher.publish("nobody/listens", b"x") == ReasonCode.NO_MATCHING_SUBSCRIBERS
    peer(peers, broker, "sub").connect().subscribe("somebody/#")
    assert publisher.publish("somebody/listens", b"x") == ReasonCode.SUCCESS


def test_v5_properties_are_forwarded_and_stripped_for_v311(broker, peers):
    v5_sub = peer(peers, broker, "sub5").connect()
    v5_sub.subscribe("cmd/#")
    v311_sub = peer(peers, broker, "sub311", V311).connect()
    v311_sub.subscribe("cmd/#")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("schema", "3")
    props.UserProperty = ("kind", "job")
    props.ResponseTopic = "fleet/coord/reply"
    props.CorrelationData = b"\x00job-17"
    props.ContentType = "application/msgpack"
    props.PayloadFormatIndicator = 0
    props.MessageExpiryInterval = 120
    publisher = peer(peers, broker, "pub").connect()
    publisher.publish("cmd/job", b"payload", props=props)
    (got,) = v5_sub.wait_messages(1)
    assert got.properties["UserProperty"] == [("schema", "3"), ("kind", "job")]
    assert got.properties["ResponseTopic"] == "fleet/coord/reply"
    assert got.properties["CorrelationData"] == b"\x00job-17".hex()
    assert got.properties["ContentType"] == "application/msgpack"
    assert got.properties["PayloadFormatIndicator"] == 0
    assert 0 < got.properties["MessageExpiryInterval"] <= 120
    (plain,) = v311_sub.wait_messages(1)
    assert (plain.payload, plain.properties) == (b"payload", {})


# ---- Wills -----------------------------------------------------------------------------------


@PROTOCOLS
def test_will_on_abrupt_socket_close(broker, peers, protocol):
    watching = watcher(peers, broker, "fleet/+/status")
    device = peer(peers, broker, "dev-1", protocol, will=("fleet/dev-1/status", b"offline"))
    device.connect(threaded=False)
    device.cut()
    (will,) = watching.wait_messages(1)
    assert (will.topic, will.payload) == ("fleet/dev-1/status", b"offline")


@PROTOCOLS
def test_will_on_keepalive_timeout(broker, peers, protocol):
    watching = watcher(peers, broker, "fleet/+/status")
    device = peer(
        peers, broker, "dev-1", protocol, keepalive_s=1, will=("fleet/dev-1/status", b"offline")
    )
    started = time.monotonic()
    device.connect(threaded=False)  # and never pumped again: no PINGREQ
    (will,) = watching.wait_messages(1, timeout_s=5)
    assert will.payload == b"offline"
    assert time.monotonic() - started >= 1.4  # 1.5 x keep-alive, give or take the clock
    assert broker.stats().forced_disconnects == 1


@PROTOCOLS
def test_no_will_on_clean_disconnect(broker, peers, protocol):
    watching = watcher(peers, broker, "fleet/+/status")
    device = peer(peers, broker, "dev-1", protocol, will=("fleet/dev-1/status", b"offline"))
    device.connect()
    device.close()
    wait_until(lambda: broker.stats().connections_current == 1)  # only the watcher is left
    barrier(peers, broker, watching, "fleet/x/status")
    assert [m.payload for m in watching.messages] == [b"marker"]


def test_v5_disconnect_with_will_message_publishes_it(broker, peers):
    watching = watcher(peers, broker, "w/#")
    device = peer(peers, broker, "dev-1", will=("w/dev-1", b"bye")).connect()
    device.client.disconnect(reasoncode=_disconnect_with_will())
    (will,) = watching.wait_messages(1)
    assert will.payload == b"bye"


def _disconnect_with_will():
    return PahoReasonCode(PacketTypes.DISCONNECT, identifier=0x04)


def test_will_delay_is_honoured_and_voided_by_reconnecting(broker, peers):
    watching = watcher(peers, broker, "w/#")
    slow = peer(
        peers, broker, "slow", will=("w/slow", b"gone"), will_delay_s=1, session_expiry_s=60
    )
    slow.connect(threaded=False)
    cut_at = time.monotonic()
    slow.cut()
    (will,) = watching.wait_messages(1)
    assert will.payload == b"gone" and time.monotonic() - cut_at >= 0.9
    # A reconnect within the delay cancels the Will.
    back = peer(
        peers, broker, "back", will=("w/back", b"gone"), will_delay_s=60, session_expiry_s=60
    )
    back.connect(threaded=False)
    back.cut()
    wait_until(lambda: broker.call(lambda b: b.pending_wills) == 1)
    again = peer(peers, broker, "back", clean=False, session_expiry_s=60).connect()
    assert again.session_present
    assert broker.call(lambda b: b.pending_wills) == 0


def test_takeover_publishes_the_will_only_when_the_session_ends(broker, peers):
    watching = watcher(peers, broker, "w/#")
    # The old connection's session ends (expiry 0): its Will goes out, it gets DISCONNECT 0x8E.
    first = peer(peers, broker, "dup", will=("w/dup", b"taken over")).connect(threaded=False)
    peer(peers, broker, "dup", clean=False).connect()
    first.pump_until(lambda: first.disconnects)
    assert first.disconnects == [ReasonCode.SESSION_TAKEN_OVER]
    (will,) = watching.wait_messages(1)
    assert will.payload == b"taken over"
    # A persistent session carried on by the new connection: no Will.
    kept = peer(peers, broker, "kept", will=("w/kept", b"no"), session_expiry_s=60, clean=False)
    kept.connect(threaded=False)
    successor = peer(peers, broker, "kept", clean=False, session_expiry_s=60).connect()
    assert successor.session_present
    barrier(peers, broker, watching, "w/end")
    assert [m.payload for m in watching.messages] == [b"taken over", b"marker"]


# ---- sessions --------------------------------------------------------------------------------


@PROTOCOLS
def test_persistent_session_queues_qos1_while_offline(broker, peers, protocol):
    device = peer(peers, broker, "dev-1", protocol, clean=False, session_expiry_s=300).connect()
    assert not device.session_present
    device.subscribe("fleet/dev-1/cmd/#", qos=1)
    device.close()
    wait_offline(broker, "dev-1")
    coordinator = peer(peers, broker, "coord", protocol).connect()
    coordinator.publish("fleet/dev-1/cmd/job", b"job-1", qos=1)
    coordinator.publish("fleet/dev-1/cmd/job", b"lost qos0", qos=0)  # not kept offline
    coordinator.publish("sync", b"", qos=1)  # its PUBACK: the QoS 0 one was routed before
    back = peer(peers, broker, "dev-1", protocol, clean=False, session_expiry_s=300).connect()
    assert back.session_present
    received = back.wait_messages(1)
    assert len(received) == 1, received
    assert (received[0].payload, received[0].qos) == (b"job-1", 1)
    # Subscriptions survived too, without subscribing again.
    coordinator.publish("fleet/dev-1/cmd/job", b"job-2", qos=1)
    assert back.wait_messages(2)[1].payload == b"job-2"


@PROTOCOLS
def test_clean_session_discards_the_old_one(broker, peers, protocol):
    device = peer(peers, broker, "dev-1", protocol, clean=False, session_expiry_s=300).connect()
    device.subscribe("a/#")
    device.close()
    wait_offline(broker, "dev-1")
    fresh = peer(peers, broker, "dev-1", protocol, clean=True).connect()
    assert not fresh.session_present
    assert broker.stats().subscriptions == 0


def test_session_expiry_ends_a_disconnected_session(broker, peers):
    device = peer(peers, broker, "dev-1", clean=False, session_expiry_s=1).connect()
    device.subscribe("a/#")
    device.close()
    wait_until(lambda: broker.stats().sessions == 0, timeout_s=3, what="the session to expire")
    assert broker.stats().subscriptions == 0


def test_the_clients_maximum_packet_size_is_respected(broker, peers):
    small = Peer(broker.port, "small")
    peers.append(small)
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = 200
    small.client.connect("127.0.0.1", broker.port, properties=props)
    small.client.loop_start()
    wait_until(lambda: small.connacks)
    small.subscribe("s/#")
    publisher = peer(peers, broker, "pub").connect()
    publisher.publish("s/big", b"x" * 500)
    publisher.publish("s/small", b"fits")
    assert small.wait_messages(1)[0].payload == b"fits"
    assert broker.stats().messages_dropped == 1


def test_unacknowledged_qos1_is_resent_with_dup_on_reconnect(broker, peers):
    raw = RawClient(broker.port)
    raw.send(connect_packet("raw-1", clean=False))
    assert raw.read_packet() == (0x20, b"\x00\x00")  # CONNACK, no session yet
    raw.send(subscribe_packet(1, "r/#", 1))
    assert raw.read_packet() == (0x90, b"\x00\x01\x01")  # SUBACK granted QoS 1
    peer(peers, broker, "pub", V311).connect().publish("r/1", b"must arrive")
    first, body = raw.read_packet()
    assert first == 0x32 and body.endswith(b"must arrive")  # PUBLISH QoS 1, never acked
    raw.close()
    wait_until(lambda: broker.stats().connections_current == 1)
    again = RawClient(broker.port)
    again.send(connect_packet("raw-1", clean=False))
    assert again.read_packet() == (0x20, b"\x01\x00")  # session present
    first, body = again.read_packet()
    assert first == 0x3A and body.endswith(b"must arrive")  # DUP set
    again.send(puback_packet(int.from_bytes(body[5:7], "big")))
    again.close()


def test_message_expiry_drops_queued_messages(broker, peers):
    device = peer(peers, broker, "dev-1", clean=False, session_expiry_s=300).connect()
    device.subscribe("c/#")
    device.close()
    wait_offline(broker, "dev-1")
    coordinator = peer(peers, broker, "coord").connect()
    short, long_ = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval, long_.MessageExpiryInterval = 1, 60
    published_at = time.monotonic()
    coordinator.publish("c/short", b"stale", props=short)
    coordinator.publish("c/long", b"fresh", props=long_)
    wait_until(lambda: time.monotonic() - published_at > 1.05, what="the short expiry to pass")
    back = peer(peers, broker, "dev-1", clean=False, session_expiry_s=300).connect()
    (received,) = back.wait_messages(1)
    assert received.payload == b"fresh"
    assert 58 <= received.properties["MessageExpiryInterval"] <= 60  # time spent queued is gone
    assert broker.stats().messages_expired == 1


# ---- limits and abuse --------------------------------------------------------------------------


@PROTOCOLS
def test_oversized_packet_disconnects_only_the_sender(make_broker, peers, protocol):
    small = make_broker(max_packet_size=4096)
    bystander = peer(peers, small, "bystander", protocol).connect()
    bystander.subscribe("big/#")
    sender = peer(peers, small, "sender", protocol).connect(threaded=False)
    sender.client.publish("big/blob", b"x" * 8000, qos=0)
    sender.pump_until(lambda: sender.disconnects)
    if protocol is V5:
        assert sender.disconnects == [ReasonCode.PACKET_TOO_LARGE]
    bystander.publish("big/small", b"still fine")
    assert bystander.wait_messages(1)[0].payload == b"still fine"
    assert small.stats().forced_disconnects == 1


@PROTOCOLS
def test_credentials_are_checked_when_users_are_configured(make_broker, peers, protocol):
    guarded = make_broker(users={"alice": "secret"})
    wrong = peer(peers, guarded, "c1", protocol, auth=("alice", "guess"))
    wrong.connect(threaded=False)
    assert wrong.connacks[-1][0] == ReasonCode.BAD_USER_NAME_OR_PASSWORD  # 3.1.1 code 4
    anonymous = peer(peers, guarded, "c2", protocol).connect(threaded=False)
    assert anonymous.connacks[-1][0] == ReasonCode.NOT_AUTHORIZED  # 3.1.1 code 5
    right = peer(peers, guarded, "c3", protocol, auth=("alice", "secret")).connect()
    assert right.accepted
    assert guarded.stats().connections_refused == 2


def test_slow_consumer_drops_qos0_and_never_blocks_others(make_broker, peers):
    config = BrokerConfig(max_queued_messages=50, write_buffer_limit=4096)
    broker = make_broker(config=config)
    stuck = RawClient(broker.port, receive_buffer=4096)
    stuck.send(connect_packet("stuck"))
    stuck.read_packet()
    stuck.send(subscribe_packet(1, "flood/#", 0))
    stuck.read_packet()  # and then never reads again
    flooder = peer(peers, broker, "flooder").connect()
    for _ in range(1500):
        flooder.client.publish("flood/x", b"y" * 8192, qos=0)
    wait_until(lambda: broker.stats().messages_dropped > 0, timeout_s=10)
    healthy = peer(peers, broker, "healthy").connect()
    healthy.subscribe("ok/#")
    healthy.publish("ok/1", b"unaffected")
    assert healthy.wait_messages(1)[0].payload == b"unaffected"
    stuck.close()


@pytest.fixture(scope="module")
def shared_broker():
    with MiniBroker() as running:
        yield running


@pytest.fixture(scope="module")
def healthy_pair(shared_broker):
    subscriber = Peer(shared_broker.port, "pair-sub").connect()
    subscriber.subscribe("pair/#")
    publisher = Peer(shared_broker.port, "pair-pub").connect()
    yield subscriber, publisher
    subscriber.close()
    publisher.close()


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(level=st.sampled_from([4, 5]), garbage=st.binary(min_size=1, max_size=300))
def test_malformed_bytes_after_connect_never_hurt_other_clients(
    shared_broker, healthy_pair, level, garbage
):
    raw = RawClient(shared_broker.port)
    raw.send(connect_packet("fuzz", level=level))
    assert raw.read_packet()[0] == 0x20
    raw.send(garbage)
    raw.close()
    subscriber, publisher = healthy_pair
    count = len(subscriber.messages)
    publisher.publish("pair/ping", garbage[:16])
    assert subscriber.wait_messages(count + 1)[count].payload == garbage[:16]
    assert shared_broker.stats().internal_errors == 0


def test_garbage_instead_of_connect_and_unsupported_versions(broker):
    raw = RawClient(broker.port)
    raw.send(b"\x30\x03\x00\x01a")  # PUBLISH before CONNECT
    assert raw.is_closed_by_peer()
    nonsense = RawClient(broker.port)
    nonsense.send(connect_packet("what", name="MQTX"))
    assert nonsense.is_closed_by_peer()
    for version in (dict(level=3, name="MQIsdp"), dict(level=6)):  # MQTT 3.1, and the future
        raw = RawClient(broker.port)
        raw.send(connect_packet("old-or-new", **version))
        assert raw.read_packet() == (0x20, b"\x00\x01")  # unacceptable protocol version
        assert raw.is_closed_by_peer()
    assert broker.stats().connections_current == 0


# ---- scale -----------------------------------------------------------------------------------


def test_300_clients_publish_to_each_other(broker):
    count = 300
    swarm = Swarm(broker.port, [f"dev-{i}" for i in range(count)], [V5, V311] * (count // 2))
    try:
        swarm.connect_all()
        for i, client in enumerate(swarm.clients):
            client.subscribe(f"load/{i}", qos=1)
        swarm.run_until(lambda: swarm.subscribed == count, what="every SUBACK")
        for i, client in enumerate(swarm.clients):
            client.publish(f"load/{(i + 1) % count}", f"from {i}".encode(), qos=1)
        swarm.run_until(lambda: all(swarm.received), what="a message for every client")
        assert swarm.received[0] == [f"from {count - 1}".encode()]
        assert broker.stats().connections_current == count
    finally:
        swarm.close()


def test_start_raises_when_the_port_is_taken(broker):
    with pytest.raises(OSError):
        MiniBroker(port=broker.port).start()


# ---- the command line ------------------------------------------------------------------------


def test_python_dash_m_runs_the_broker():
    process = subprocess.Popen(
        [sys.executable, "-m", "skipfleet.minibroker", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        client = Peer(port, "cli-check").connect()
        client.subscribe("x")
        client.publish("x", b"via the CLI")
        assert client.wait_messages(1)[0].payload == b"via the CLI"
        client.close()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# ---- codec and routing units -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 127, 128, 16383, 16384, 2_097_151, 2_097_152, 268_435_455])
def test_variable_byte_integers_round_trip(value):
    encoded = encode_varint(value)
    assert len(encoded) == 1 + (value > 127) + (value > 16383) + (value > 2_097_151)
    assert Reader(encoded).varint() == value


def test_frames_are_refused_by_size_before_they_arrive():
    header = b"\x30" + encode_varint(1_000_000)
    with pytest.raises(PacketError) as error:
        find_frame(header, max_packet_size=256 * 1024)
    assert error.value.reason is ReasonCode.PACKET_TOO_LARGE
    assert find_frame(b"\x30\x05ab", 1024) is None  # incomplete: wait for more
    with pytest.raises(PacketError):
        find_frame(b"\x30\xff\xff\xff\xff\x01", 1 << 30)  # a fifth length byte


@pytest.mark.parametrize(
    ("first_byte", "body", "reason"),
    [
        (0x36, b"\x00\x01a\x00\x01", ReasonCode.MALFORMED_PACKET),  # QoS 3
        (0x30, b"\x00\x03a/+\x00", ReasonCode.TOPIC_NAME_INVALID),  # wildcard in a topic name
        (0x30, b"\x00\x02\xc3\x28", ReasonCode.MALFORMED_PACKET),  # invalid UTF-8
        (0x30, b"\x00\x01a\x03\x23\x00\x01", ReasonCode.TOPIC_ALIAS_INVALID),
        (0x30, b"\x00\x01a\x04\x02\x00\x00\x00", ReasonCode.MALFORMED_PACKET),  # cut property
        (0x30, b"\x00\x01a\x02\x11\x00", ReasonCode.MALFORMED_PACKET),  # not a PUBLISH property
        (0x80, b"\x00\x01\x00\x00\x01a\x01", ReasonCode.MALFORMED_PACKET),  # SUBSCRIBE flags 0
        (0x82, b"\x00\x01\x00", ReasonCode.PROTOCOL_ERROR),  # no topic filters
        (
            0x82,
            b"\x00\x01\x02\x0b\x01\x00\x01a\x01",
            ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
        ),
        (0x20, b"\x00\x00", ReasonCode.PROTOCOL_ERROR),  # CONNACK from a client
        (0x00, b"", ReasonCode.MALFORMED_PACKET),
    ],
)
def test_bad_packets_raise_packet_errors(first_byte, body, reason):
    with pytest.raises(PacketError) as error:
        decode_packet(first_byte, body, ProtocolLevel.MQTT_5)
    assert error.value.reason is reason


FILTER_CASES = [
    ("a/b", "a/b", True),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("+/+", "/x", True),
    ("+", "a/b", False),
    ("#", "$SYS/x", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/+/c", "a//c", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), FILTER_CASES)
def test_topic_matching_rules(topic_filter, topic, expected):
    assert filter_matches(topic_filter, topic) is expected
    tree = SubscriptionTree()
    tree.add(topic_filter, "s", SubscriptionOptions(qos=1))
    assert bool(tree.match(topic)) is expected
    store = RetainedStore()
    store.store(Message(topic, b"x", 0, True))
    assert bool(store.matching(topic_filter, now=0.0)) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "+a"])
def test_invalid_filters(bad):
    assert not is_valid_filter(bad)


_levels = st.lists(st.sampled_from(["a", "b", "", "$x"]), min_size=1, max_size=4)


@given(
    filter_levels=st.lists(st.sampled_from(["a", "b", "+", ""]), min_size=1, max_size=4),
    multi=st.booleans(),
    topic_levels=_levels,
)
def test_the_trees_agree_with_the_reference_matcher(filter_levels, multi, topic_levels):
    topic_filter = "/".join(filter_levels + (["#"] if multi else []))
    topic = "/".join(topic_levels)
    expected = filter_matches(topic_filter, topic)
    tree = SubscriptionTree()
    tree.add(topic_filter, "s", SubscriptionOptions(qos=0))
    store = RetainedStore()
    store.store(Message(topic, b"x", 0, True))
    assert bool(tree.match(topic)) is expected
    assert bool(store.matching(topic_filter, now=0.0)) is expected


def test_unsubscribing_prunes_the_tree():
    tree = SubscriptionTree()
    tree.add("fleet/dev-1/cmd/#", "s", SubscriptionOptions(qos=1))
    assert tree.remove("fleet/dev-1/cmd/#", "s") and len(tree) == 0
    assert not tree._root.children


def test_a_full_queue_gives_up_qos0_first():
    session = Session("s", QueueLimits(max_queued=3, max_inflight=1))
    message = Message("t", b"x", 1, False)
    qos0, qos1 = Delivery(message, 0, False), Delivery(message, 1, False)
    for delivery in (qos0, qos1, qos0):
        assert session.enqueue(delivery)
    assert session.enqueue(qos1)  # replaces the oldest QoS 0
    assert [d.qos for d in session.pending] == [1, 0, 1] and session.dropped == 1
    assert not session.enqueue(qos0)  # a new QoS 0 into a full queue is dropped
    assert session.enqueue(qos1)
    assert not session.enqueue(qos1)  # all QoS 1: only now is QoS 1 dropped
    assert session.dropped == 4
