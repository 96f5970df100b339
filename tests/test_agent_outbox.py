"""Spool -> broker: a window of messages in flight, each deleted only on its PUBACK."""

from __future__ import annotations

import itertools
import threading

import pytest

from agent.outbox import Outbox
from agent.spool import Priority, Spool


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeClient:
    """Hands out mids like paho; `ack_inside` simulates a PUBACK before publish() returns."""

    def __init__(self):
        self.mids = itertools.count(1)
        self.sent: list[tuple[int, str]] = []
        self.refuse = False
        self.outbox: Outbox | None = None
        self.ack_inside = False

    def publish(self, item):
        if self.refuse:
            return None
        mid = next(self.mids)
        self.sent.append((mid, item.topic))
        if self.ack_inside:
            self.outbox.acknowledged(mid, accepted=True)
        return mid


@pytest.fixture
def parts(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=100)
    client = FakeClient()
    clock = FakeClock()
    outbox = Outbox(spool, client.publish, window=3, retry_after_seconds=30, clock=clock)
    client.outbox = outbox
    yield spool, client, outbox, clock
    spool.close()


def spool_records(spool, n):
    return [spool.put(f"r/{i}", b"x", priority=Priority.RECORD) for i in range(n)]


def test_nothing_is_sent_while_disconnected(parts):
    spool, _, outbox, _ = parts
    spool_records(spool, 2)
    assert outbox.pump() == 0
    outbox.connected()
    assert outbox.pump() == 2


def test_window_limits_in_flight_and_puback_frees_a_slot(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 5)
    outbox.connected()
    assert outbox.pump() == 3
    assert outbox.pump() == 0  # window full
    outbox.acknowledged(client.sent[0][0], accepted=True)
    assert spool.stats().depth == 4
    assert outbox.pump() == 1
    assert [t for _, t in client.sent] == ["r/0", "r/1", "r/2", "r/3"]


def test_puback_before_publish_returns_is_not_lost(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 2)
    client.ack_inside = True
    outbox.connected()
    assert outbox.pump() == 2
    assert spool.stats().depth == 0
    assert outbox.stats().in_flight == 0


def test_disconnect_keeps_in_flight_so_reconnect_does_not_duplicate(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 2)
    outbox.connected()
    outbox.pump()
    outbox.disconnected()
    outbox.connected()  # paho itself re-sends its in-flight messages after CONNACK
    assert outbox.pump() == 0
    assert len(client.sent) == 2


def test_an_outage_longer_than_the_retry_time_hands_no_row_to_paho_twice(parts):
    # Issue 10: after > 60 s without PUBACK every in-flight row was handed over again while
    # paho re-sent its own copies (4 sends for 2 messages).
    spool, client, outbox, clock = parts
    spool_records(spool, 2)
    outbox.connected()
    assert outbox.pump() == 2
    outbox.disconnected()
    clock.now += 3600
    outbox.connected()  # paho re-sends its 2 itself after the CONNACK
    assert outbox.pump() == 0
    assert [t for _, t in client.sent] == ["r/0", "r/1"] and outbox.handed_over == 2
    for mid, _ in client.sent:
        outbox.acknowledged(mid, accepted=True)
    assert spool.stats().depth == 0


def test_a_row_paho_dropped_for_quota_is_handed_over_again_after_the_retry_time(parts):
    spool, client, outbox, clock = parts
    spool_records(spool, 1)
    outbox.connected()
    outbox.pump()
    outbox.acknowledged(client.sent[0][0], accepted=None)  # v5 PUBACK quota exceeded
    assert outbox.pump() == 0 and spool.stats().depth == 1
    clock.now += 31
    assert outbox.pump() == 1
    assert [t for _, t in client.sent] == ["r/0", "r/0"]


def test_refused_by_broker_is_dropped_and_counted(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 1)
    outbox.connected()
    outbox.pump()
    outbox.acknowledged(client.sent[0][0], accepted=False)
    assert spool.stats().depth == 0
    assert outbox.stats().refused_for_good == 1


def test_client_refusal_leaves_messages_spooled(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 2)
    client.refuse = True
    outbox.connected()
    assert outbox.pump() == 0
    assert spool.stats().depth == 2


def test_thread_drains_the_spool_when_notified(parts):
    spool, client, outbox, _ = parts
    drained = threading.Event()

    def publish_and_ack(item):
        mid = FakeClient.publish(client, item)
        threading.Thread(target=outbox.acknowledged, args=(mid, True)).start()
        if item.topic == "r/9":
            drained.set()
        return mid

    outbox._publish = publish_and_ack
    outbox.start()
    try:
        spool_records(spool, 10)
        outbox.connected()
        assert drained.wait(5)
    finally:
        outbox.stop()
    assert [t for _, t in client.sent] == [f"r/{i}" for i in range(10)]


def test_a_row_the_client_can_never_publish_does_not_block_the_rest(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 2)
    publish = client.publish

    def refuse_first(item):
        if item.topic == "r/0":
            raise ValueError("Invalid topic.")
        return publish(item)

    outbox._publish = refuse_first
    outbox.connected()
    assert outbox.pump() == 1
    assert [t for _, t in client.sent] == ["r/1"]
    assert outbox.stats().refused_for_good == 1 and spool.stats().depth == 1


def test_a_pump_while_a_puback_is_being_settled_does_not_hand_the_row_over_again(parts):
    spool, client, outbox, _ = parts
    spool_records(spool, 1)
    outbox.connected()
    outbox.pump()
    entered, release = threading.Event(), threading.Event()
    ack = spool.ack

    def slow_ack(item_id):  # the row's delete is slow (SQLite commit on an SD card)
        entered.set()
        assert release.wait(5)
        return ack(item_id)

    spool.ack = slow_ack
    settling = threading.Thread(target=outbox.acknowledged, args=(client.sent[0][0], True))
    settling.start()
    try:
        assert entered.wait(5)
        assert outbox.pump() == 0  # the row is still spooled, but it is not sent twice
    finally:
        release.set()
        settling.join(5)
    assert [t for _, t in client.sent] == ["r/0"] and spool.stats().depth == 0
