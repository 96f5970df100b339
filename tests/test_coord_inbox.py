"""coordinator.inbox: the bridge's queue of received messages, taken in lingering batches, its
consumer woken only when what it waits for has come."""

import threading
import time

from coordinator.clock import ManualClock
from coordinator.delivery import AckToken
from coordinator.inbox import Inbox, Linger, events_in, is_event
from tests.coord_fleet_helpers import SimDevice

LONG_S = 30.0  # a wait no test lets run out: the test would take that long


def items(device: SimDevice, *kinds: str) -> list:
    made = {"beat": device.heartbeat, "presence": device.presence}
    return [(made[kind](), AckToken(n, 1, 1)) for n, kind in enumerate(kinds)]


def device() -> SimDevice:
    return SimDevice("pi-1", ManualClock())


def put_later(inbox: Inbox, queued: list, every_s: float = 0.02) -> threading.Thread:
    def put() -> None:
        for item in queued:
            time.sleep(every_s)
            inbox.put(item)

    thread = threading.Thread(target=put)
    thread.start()
    return thread


class CountingWakes:
    """Counts the notifies a put sends the waiting consumer."""

    def __init__(self, inbox: Inbox) -> None:
        self.count = 0
        notify = inbox._changed.notify

        def counted(n: int = 1) -> None:
            self.count += 1
            notify(n)

        inbox._changed.notify = counted  # type: ignore[method-assign]


def test_nothing_queued_gives_an_empty_batch_after_the_first_wait():
    inbox = Inbox(Linger(below=4, seconds=0.01, beats_seconds=LONG_S))
    started = time.monotonic()
    assert inbox.next_batch(0.05, 10, lambda: False) == []
    assert 0.04 <= time.monotonic() - started < LONG_S


def test_heartbeats_trickling_into_a_lingering_batch_wake_its_consumer_once_when_it_is_full():
    inbox = Inbox(Linger(below=6, seconds=0.01, beats_seconds=LONG_S))
    wakes = CountingWakes(inbox)
    beats = items(device(), *["beat"] * 6)
    inbox.put(beats[0])
    putter = put_later(inbox, beats[1:])
    batch = inbox.next_batch(LONG_S, 10, lambda: False)
    putter.join()
    assert batch == beats  # all six, the linger ended by the sixth, not by LONG_S
    assert wakes.count == 1  # queue.Queue woke the consumer for each of the five


def test_a_first_message_wakes_a_consumer_waiting_for_one():
    inbox = Inbox(Linger(below=1, seconds=0.01, beats_seconds=LONG_S))
    (beat,) = items(device(), "beat")
    putter = put_later(inbox, [beat])
    assert inbox.next_batch(LONG_S, 10, lambda: False) == [beat]
    putter.join()


def test_an_event_cuts_the_heartbeats_linger_short():
    inbox = Inbox(Linger(below=64, seconds=0.05, beats_seconds=LONG_S))
    queued = items(device(), "beat", "beat", "presence")
    inbox.put(queued[0])
    putter = put_later(inbox, queued[1:])
    started = time.monotonic()
    batch = inbox.next_batch(LONG_S, 10, lambda: False)
    putter.join()
    assert batch == queued
    assert time.monotonic() - started < 1.0  # LONG_S without the cut


def test_a_batch_with_an_event_lingers_the_short_time_only():
    inbox = Inbox(Linger(below=64, seconds=0.05, beats_seconds=LONG_S))
    (presence,) = items(device(), "presence")
    inbox.put(presence)
    started = time.monotonic()
    assert inbox.next_batch(LONG_S, 10, lambda: False) == [presence]
    assert 0.04 <= time.monotonic() - started < 1.0


def test_a_full_batch_does_not_linger_and_the_limit_leaves_the_rest_queued():
    inbox = Inbox(Linger(below=2, seconds=LONG_S, beats_seconds=LONG_S))
    queued = items(device(), "beat", "presence", "beat")
    for item in queued:
        inbox.put(item)
    started = time.monotonic()
    assert inbox.next_batch(LONG_S, 2, lambda: False) == queued[:2]
    assert time.monotonic() - started < 1.0  # LONG_S had it lingered
    assert len(inbox) == 1
    assert inbox.take(10) == queued[2:]
    assert len(inbox) == 0


def test_a_stopping_bridge_takes_a_small_batch_without_lingering():
    inbox = Inbox(Linger(below=64, seconds=LONG_S, beats_seconds=LONG_S))
    (beat,) = items(device(), "beat")
    inbox.put(beat)
    started = time.monotonic()
    assert inbox.next_batch(LONG_S, 10, lambda: True) == [beat]
    assert time.monotonic() - started < 1.0


def test_events_are_device_messages_other_than_heartbeats():
    beat, presence = items(device(), "beat", "presence")
    refused = (None, AckToken(9, 1, 1))
    assert [is_event(i) for i in (beat, presence, refused)] == [False, True, False]
    assert events_in([beat, refused]) is False
    assert events_in([beat, presence]) is True
