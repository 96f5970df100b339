"""Removing the retained messages a run left under its topic root (presence, desired pointers).

A retained message stays on the broker until something replaces it; an empty retained payload
deletes it (MQTT 3.3.1.3). `skipfleet simulate` runs under a topic root of its own and, once its
agents and coordinator have stopped, clears what they left, so a broker it was given is as clean
as before (and a later run never reads this one's presence or desired versions).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from shared.mqtt import MqttSettings, connect_async, make_client

QUIET_S = 0.5  # retained messages follow the SUBACK at once; this long without one: all seen


def clear_retained(settings: MqttSettings, root: str, client_id: str, timeout_s: float = 10.0):
    """Deletes every retained message under `root/#`; returns the topics it cleared."""
    if not root or any(c in root for c in "+#/"):
        raise ValueError(f"topic root {root!r} must be one plain topic level")
    retained: set[str] = set()
    lock = threading.Lock()
    subscribed = threading.Event()
    last_seen = [time.monotonic()]
    # A clean session, without a will: this client must leave nothing behind itself.
    settings = replace(settings, session_expiry_s=0)
    client = make_client(settings, client_id)

    def on_message(client, userdata, message) -> None:
        if message.retain and message.payload:
            with lock:
                retained.add(message.topic)
                last_seen[0] = time.monotonic()

    client.on_connect = lambda c, *a: c.subscribe(f"{root}/#", qos=1)

    def on_subscribe(*args) -> None:
        last_seen[0] = time.monotonic()
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    connect_async(client, settings)
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise TimeoutError(f"could not subscribe to {root}/# on {settings.host}")
        while time.monotonic() - last_seen[0] < QUIET_S:
            time.sleep(0.05)
        with lock:
            topics = sorted(retained)
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout_s)
        return topics
    finally:
        client.disconnect()
        client.loop_stop()
