"""The simulated devices' MQTT client (skipfleet.loadgen.client): the same bytes on the wire as
paho's, with less work per packet; and the generator's cheaper bookkeeping (install log lines,
IN_PROGRESS timers) saying and sending what it did before."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from shared.lean_client import LeanClient
from skipfleet.loadgen.client import DeviceClient
from skipfleet.loadgen.process import InstallLog

TOPIC = "fleet/sim-00001/cmd/job"


def connected(cls, received: list) -> tuple[LeanClient, socket.socket]:
    """A client of `cls` as if connected (MQTT v5), and the broker's end of its socket."""
    client = cls(CallbackAPIVersion.VERSION2, client_id="sim-00001",
                 protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    broker.setblocking(False)
    client._sock = ours
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    client.on_socket_register_write = lambda *_: None  # written by the test (loop_write)
    client.on_message = lambda c, u, message: received.append((message.topic, message.payload))
    if isinstance(client, DeviceClient):
        client.on_payload = lambda topic, payload: received.append((topic, payload))
    return client, broker


def publish_packet(mid: int, payload: bytes, topic: str = TOPIC) -> bytes:
    """A QoS 1 MQTT v5 PUBLISH as the broker sends it, with one property (a content type)."""
    properties = b"\x03" + struct.pack("!H", 3) + b"a/b"
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", mid)
    body += bytes([len(properties)]) + properties + payload
    return bytes([0x32]) + remaining_length(len(body)) + body


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sent(client: LeanClient, broker: socket.socket) -> bytes:
    client.loop_write()
    try:
        return broker.recv(1 << 20)
    except BlockingIOError:
        return b""


def stream() -> bytes:
    """Three commands, one of them larger than a read of paho's and split over two lengths."""
    return publish_packet(1, b"a" * 10) + publish_packet(2, b"b" * 200) + publish_packet(3, b"")


def test_packets_read_at_once_reach_the_device_as_paho_delivers_them():
    expected: list = []
    paho_client, paho_broker = connected(LeanClient, expected)
    paho_broker.sendall(stream())
    for _ in range(3):  # paho reads one packet a call (epoll says the socket still has more)
        paho_client.loop_read()
    received: list = []
    client, broker = connected(DeviceClient, received)
    broker.sendall(stream())
    client.loop_read()  # once: nothing may stay in its buffer
    assert received == expected and len(received) == 3
    assert received[1] == (TOPIC, b"b" * 200)
    acks = sent(client, broker)
    assert (
        acks
        == sent(paho_client, paho_broker)
        == b"".join(bytes([0x40, 2, 0, mid]) for mid in (1, 2, 3))
    )
    assert len(client._out_packet) == 0


def test_a_packet_split_over_reads_is_delivered_once_whole():
    received: list = []
    client, broker = connected(DeviceClient, received)
    packet = publish_packet(7, b"x" * 5000)
    broker.sendall(packet[:2])  # the type and half of the length
    client.loop_read()
    for start in range(2, 4000, 1000):
        broker.sendall(packet[start : start + 1000])
        client.loop_read()
    assert received == []
    broker.sendall(packet[4002:] + publish_packet(8, b"next"))  # its end, and the next one
    client.loop_read()
    assert received == [(TOPIC, b"x" * 5000), (TOPIC, b"next")]


def test_a_closed_connection_is_reported_and_its_bytes_are_dropped():
    received: list = []
    client, broker = connected(DeviceClient, received)
    lost: list = []
    client.on_disconnect = lambda *args: lost.append(args)
    broker.sendall(publish_packet(1, b"late")[:5])  # a packet cut short, then the end
    broker.close()
    client.loop_read()
    assert received == [] and lost and client._sock is None
    assert not client._unread  # the packet it cut short: dropped with it


def test_a_qos1_publish_puts_the_same_bytes_on_the_wire_as_paho():
    theirs, their_broker = connected(LeanClient, [])
    ours, our_broker = connected(DeviceClient, [])
    for client in (theirs, ours):
        client.publish("fleet/sim-00001/job", b"status", qos=1)
        client.publish("fleet/sim-00001/status", b"online", qos=1, retain=True)
        client.publish("fleet/sim-00001/telemetry", b"beat", qos=0)
    assert sent(ours, our_broker) == sent(theirs, their_broker)
    assert list(ours._out_messages) == list(theirs._out_messages) == [1, 2]
    assert ours._inflight_messages == 2


def test_a_puback_completes_the_publish_as_paho_does():
    client, broker = connected(DeviceClient, [])
    info = client.publish("fleet/sim-00001/report", b"report", qos=1)
    assert not info.is_published()
    sent(client, broker)
    broker.sendall(bytes([0x40, 2, 0, info.mid]))
    client.loop_read()
    assert info.is_published() and not client._out_messages and client._inflight_messages == 0


def test_packets_over_the_inflight_limit_wait_for_a_puback_as_with_paho():
    client, broker = connected(DeviceClient, [])
    client._max_inflight_messages = 1
    first = client.publish("fleet/sim-00001/job", b"one", qos=1)
    second = client.publish("fleet/sim-00001/job", b"two", qos=1)
    assert sent(client, broker).endswith(b"one")
    broker.sendall(bytes([0x40, 2, 0, first.mid]))
    client.loop_read()
    assert first.is_published() and sent(client, broker).endswith(b"two")
    assert not second.is_published()


def test_a_puback_and_the_status_it_led_to_go_out_in_one_packet_a_qos0_one_alone():
    client, broker = connected(DeviceClient, [])
    client._send_puback(5)
    client.publish("fleet/sim-00001/job", b"done", qos=1)
    assert len(client._out_packet) == 1
    client.publish("fleet/sim-00001/telemetry", b"beat", qos=0)  # paho acts once it is out
    assert len(client._out_packet) == 2
    wire = sent(client, broker)
    assert wire.startswith(bytes([0x40, 2, 0, 5])) and wire.endswith(b"beat")


def test_an_install_line_is_the_json_it_was(tmp_path):
    log = InstallLog(tmp_path / "installs.jsonl")
    log("sim-00001", 3, "apply_adapter")
    log("sim-00002", None, "finetune")
    log.close()
    first, second = (json.loads(line) for line in (tmp_path / "installs.jsonl").open())
    assert set(first) == {"device", "version", "how", "at"}
    assert (first["device"], first["version"], first["how"]) == ("sim-00001", 3, "apply_adapter")
    assert second["version"] is None and isinstance(second["at"], float)
    assert second["at"] == pytest.approx(first["at"], abs=5)


def test_the_generator_benchmark_plays_whole_rounds_to_generators_side_by_side(
    data_dir, tmp_path, capsys
):
    from skipfleet import bench_loadgen
    from skipfleet.processes import REPO

    argv = ["--devices", "3", "--rounds", "1", "--repeat", "2", "--idle-seconds", "0.5",
            "--side-by-side", str(REPO),  # this tree again: a second process of 3 devices
            "--data-dir", str(data_dir), "--work-dir", str(tmp_path)]  # fmt: skip
    assert bench_loadgen.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "(runs: " in line]
    assert len(lines) == 2
    for line in lines:
        runs = line.split("(runs: ")[1].split(")")[0].split()
        assert len(runs) == 2 and all(float(ms) >= 0 for ms in runs)  # 3 devices: a tick or none
    for n in range(2):
        path = tmp_path / "loadgen" / f"installs-{n}.jsonl"
        installs = [json.loads(line) for line in path.open()]
        applied = {(i["device"], i["version"]) for i in installs if i["how"] == "apply_adapter"}
        devices = {f"sim-{index:05d}" for index in range(3 * n, 3 * n + 3)}
        assert applied == {(d, v) for d in devices for v in (1, 2, 3)}  # the warm-up, then two
