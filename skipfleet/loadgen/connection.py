"""Many paho clients on one asyncio loop: one MQTT connection per simulated device.

paho's own `loop_start()` is a thread per client, and a few hundred of those in one process
stall (measured: 2 processes × 500 clients delivered 511 of 1,000 reports in 120 s). Here one
loop drives every client of the process through paho's external-loop hooks: its socket is
read when readable, written when paho has bytes queued, and `loop_misc` keeps the sessions
alive once a second. Measured on the 2-core machine: 1,000 devices in ONE process were online
in 3.1 s and took a 1,000-device round as fast as 4 or 10 processes did (about 3 CPU seconds
per round for the whole fleet). Connections are made as the agent's (shared.mqtt.make_client with a
retained Last Will, MQTT v5 persistent session), as LeanClients: a simulated device reads no
inbound message's MQTT v5 properties, and building them was ~15 % of a generator's CPU (py-spy,
1,000 devices). paho does not reconnect by itself here, so a lost connection is retried with
jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random

import paho.mqtt.client as paho

from shared.mqtt import MqttSettings, Will, backoff_delay, connect_async, logged, make_client
from shared.protocol.enums import PresenceState
from skipfleet.loadgen.client import DeviceClient
from skipfleet.loadgen.device import SimulatedDevice

log = logging.getLogger(__name__)

KEEPALIVE_TICK_S = 1.0
BAD_CREDENTIALS = frozenset({0x86, 0x87})


class LoopDriver:
    """Reads, writes and keeps alive every attached client from one asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clients: list[paho.Client] = []
        self._reading: paho.Client | None = None  # the client whose socket is being read

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._wants_write
        client.on_socket_unregister_write = self._wrote
        self._clients.append(client)

    def _opened(self, client: paho.Client, userdata: object, sock) -> None:
        self._loop.add_reader(sock, self._read, client, sock)

    def _closed(self, client: paho.Client, userdata: object, sock) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _read(self, client: paho.Client, sock) -> None:
        """What arrived, then what answering it queued (PUBACKs, statuses) in one go, in this
        loop turn: a loop turn later cost a scheduled callback per read."""
        self._reading = client
        try:
            client.loop_read()
        finally:
            self._reading = None
        if client.want_write() and client.socket() is sock:
            self._flush(client, sock)

    def _wants_write(self, client: paho.Client, userdata: object, sock) -> None:
        # paho asks once per burst of queued packets. Writing them on the next loop turn saves
        # registering the socket for write and unregistering it after (two epoll_ctl calls
        # and a select wake-up per publish, 6% of a generator's CPU in a round); only a socket
        # whose send buffer is full waits to be writable. A client being read writes when its
        # read is done (_read).
        if client is not self._reading:
            self._loop.call_soon(self._flush, client, sock)

    def _flush(self, client: paho.Client, sock) -> None:
        client.loop_write()
        # Still data to send: paho does not ask again while it thinks it asked (it did)
        if client.want_write() and client.socket() is sock:
            self._loop.add_writer(sock, client.loop_write)

    def _wrote(self, client: paho.Client, userdata: object, sock) -> None:
        self._loop.remove_writer(sock)

    async def keep_alive(self) -> None:
        """PINGREQs and keepalive checks for every client (paho's loop_misc), once a second."""
        while True:
            for client in self._clients:
                client.loop_misc()
            await asyncio.sleep(KEEPALIVE_TICK_S)


class DeviceConnection:
    def __init__(
        self,
        device: SimulatedDevice,
        settings: MqttSettings,
        driver: LoopDriver,
        loop: asyncio.AbstractEventLoop,
        *,
        will_delay_s: int,
        rng: random.Random,
    ) -> None:
        self.device = device
        self._settings = settings
        self._loop = loop
        self._rng = rng
        self._attempts = 0
        self._stopping = False
        self.connected = asyncio.Event()
        offline = device.presence(PresenceState.OFFLINE)
        will = Will(device.status_topic, offline, delay_s=will_delay_s)
        client = make_client(settings, device.device_id, will=will, rng=rng,
                             client_class=DeviceClient)  # fmt: skip
        assert isinstance(client, DeviceClient)
        self.client = client
        self.client.on_connect = logged(self._handle_connect)
        self.client.on_disconnect = logged(self._handle_disconnect)
        self.client.on_message = logged(self._handle_message)  # what on_payload does not take
        self.client.on_payload = logged(device.on_message)
        driver.attach(self.client)
        connect_async(self.client, settings)  # host, port and v5 session; connected by connect()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """paho queues QoS 1 while disconnected and drops QoS 0, as for the agent's client (the
        agent's spool is not simulated)."""
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def connect(self) -> None:
        try:
            self.client.reconnect()
        except OSError as err:
            self._retry_later(f"connect failed: {err}")

    async def close(self, timeout_s: float = 5.0) -> None:
        """A clean stop, as the agent's: retained `offline`, then DISCONNECT (no Will)."""
        self._stopping = True
        self.device.stop()
        if self.connected.is_set():
            offline = self.device.presence(PresenceState.OFFLINE)
            info = self.client.publish(self.device.status_topic, offline, qos=1, retain=True)
            await _published(info, timeout_s)
        self.client.disconnect()

    # ---- paho callbacks, on the loop

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # paho closes the socket next: the disconnect retries
            log.error("%s: broker refused the connection: %s", self.device.device_id, reason_code)
            if reason_code.value in BAD_CREDENTIALS:
                self._stopping = True  # as the agent: retrying cannot fix these
            return
        self._attempts = 0
        client.subscribe(self.device.subscriptions())
        self.device.on_connected()
        self.connected.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stopping:
            self._retry_later(f"disconnected: {reason_code}")

    def _handle_message(self, client, userdata, message) -> None:
        self.device.on_message(message.topic, message.payload)

    def _retry_later(self, why: str) -> None:
        s = self._settings
        delay = backoff_delay(
            self._attempts, base_s=s.reconnect_min_delay_s, cap_s=s.reconnect_max_delay_s,
            rng=self._rng,
        )  # fmt: skip
        self._attempts += 1
        log.warning("%s: %s; reconnecting in %.1f s", self.device.device_id, why, delay)
        self._loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self._stopping:
            self.connect()


async def _published(info: paho.MQTTMessageInfo, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not info.is_published() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
