"""paho-mqtt 2.x plumbing shared by the agent and the coordinator: broker URLs, connection
settings, client construction, MQTT v5 publish properties, backoff and publish-size checks."""

from __future__ import annotations

import copy
import functools
import logging
import math
import random
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from shared.lean_client import LeanClient
from shared.protocol import SCHEMA_VERSION, Envelope

log = logging.getLogger(__name__)


def logged(callback: Callable[..., object]) -> Callable[..., None]:
    """paho re-raises callback exceptions into its loop by default: log them instead."""

    @functools.wraps(callback)
    def wrapper(*args: object, **kwargs: object) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", callback.__name__)

    return wrapper


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
CONTENT_TYPE = "application/msgpack"


class MqttProtocol(StrEnum):
    V5 = "5"
    V311 = "3.1.1"


class PublishTooLarge(ValueError):
    """A payload over the broker's packet limit: mosquitto would disconnect the client."""


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 1883
    tls: bool = False
    tls_ca: str | None = None  # CA bundle path; None with tls: the system's CAs
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: MqttProtocol = MqttProtocol.V5
    keepalive_s: int = 30
    reconnect_min_delay_s: int = 1
    reconnect_max_delay_s: int = 60
    # > 0: a persistent session (QoS 1 commands queued while offline survive reconnects).
    session_expiry_s: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("MQTT host must be a non-empty string")
        if not 0 < self.port < 65536:
            raise ValueError(f"MQTT port {self.port} is out of range")
        if self.password is not None and self.username is None:
            raise ValueError("an MQTT password needs a username")
        if not 1 <= self.reconnect_min_delay_s <= self.reconnect_max_delay_s:
            raise ValueError("need 1 <= reconnect_min_delay_s <= reconnect_max_delay_s")
        if self.keepalive_s < 1 or not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError("keepalive_s must be positive, session_expiry_s a uint32")
        # Accept "5" / "3.1.1" from config files; identity checks below need the member.
        object.__setattr__(self, "protocol", MqttProtocol(self.protocol))

    @property
    def persistent_session(self) -> bool:
        return self.session_expiry_s > 0

    @property
    def url(self) -> str:
        """The broker URL without credentials, for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str, **overrides: Any) -> MqttSettings:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...` -> settings; keyword overrides win."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"bad broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"bad broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad broker URL {url!r}: no path, query or fragment allowed")
    settings = MqttSettings(
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )
    return replace(settings, **overrides)


@dataclass(frozen=True)
class Will:
    """Last Will: published by the broker if the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    delay_s: int = 0  # MQTT v5: ride out short reconnects before announcing the loss


def jittered_reconnect_delays(
    settings: MqttSettings, rng: random.Random | None = None
) -> tuple[int, int]:
    """(min, max) reconnect delays for paho, drawn around the settings' bounds."""
    rng = rng or random.Random()
    # paho doubles the delay without jitter; spreading each client's bounds keeps a fleet that
    # lost the broker together from reconnecting in lock step.
    lowest, highest = settings.reconnect_min_delay_s, settings.reconnect_max_delay_s
    low = min(rng.randint(lowest, 2 * lowest), highest)
    high = max(low, rng.randint(highest * 3 // 4, highest))
    return low, high


def make_client(
    settings: MqttSettings,
    client_id: str,
    *,
    will: Will | None = None,
    userdata: object = None,
    rng: random.Random | None = None,
    manual_ack: bool = False,
    lean: bool = False,
    client_class: type[paho.Client] | None = None,
) -> paho.Client:
    """A configured, unconnected paho 2.x client (callback API version 2). manual_ack: the
    caller acknowledges each QoS 1 message itself (client.ack) once it is safe, not paho on
    return from on_message. lean: a LeanClient (shared.lean_client), which does not decode an
    inbound PUBLISH's MQTT v5 properties (its message.properties is None). client_class: this
    subclass of paho's Client instead (constructed as paho's)."""
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("client_id must be a non-empty string")
    v5 = settings.protocol is MqttProtocol.V5
    client = (client_class or (LeanClient if lean else paho.Client))(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else not settings.persistent_session,
        userdata=userdata,
        manual_ack=manual_ack,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=settings.tls_ca)
    client.reconnect_delay_set(*jittered_reconnect_delays(settings, rng))
    if will is not None:
        client.will_set(
            will.topic,
            will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=_will_props(will, v5),
        )
    return client


def _will_props(will: Will, v5: bool) -> Properties | None:
    if not v5 or will.delay_s <= 0:
        return None
    props = Properties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = will.delay_s
    return props


def connect_async(
    client: paho.Client, settings: MqttSettings, *, receive_maximum: int | None = None
) -> None:
    """Start connecting (retried by paho's loop): clean start or session expiry as configured.
    receive_maximum (MQTT v5): how many unacknowledged QoS 1 messages the broker may have in
    flight to us (mosquitto's own default is 20: too few for a client that acknowledges late)."""
    if settings.protocol is not MqttProtocol.V5:
        client.connect_async(settings.host, settings.port, settings.keepalive_s)
        return
    props = Properties(PacketTypes.CONNECT)
    if settings.persistent_session:
        props.SessionExpiryInterval = settings.session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        settings.keepalive_s,
        clean_start=not settings.persistent_session,
        properties=props,
    )


@functools.cache
def _publish_template(kind: str) -> Properties:
    """The properties every PUBLISH of a kind carries. Copied for each message: building
    Properties (and setting each through its checks) cost ~20 µs a publish, most of a
    coordinator's per-message publishing time."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = CONTENT_TYPE
    props.UserProperty = ("schema", str(SCHEMA_VERSION))
    props.UserProperty = ("kind", kind)
    return props


def publish_properties(envelope: Envelope, *, now: float | None = None) -> Properties:
    """MQTT v5 PUBLISH properties mirroring the envelope (which carries all of it anyway)."""
    props = copy.copy(_publish_template(envelope.kind.value))
    if envelope.expires_at is not None:
        remaining = envelope.expires_at - (time.time() if now is None else now)
        props.MessageExpiryInterval = max(1, math.ceil(remaining))
    if envelope.reply_to is not None:
        props.ResponseTopic = envelope.reply_to
    # A request correlates by its own id; an answer echoes the id of the request.
    correlation = envelope.correlation_id
    if correlation is None and envelope.reply_to is not None:
        correlation = envelope.message_id
    if correlation is not None:
        props.CorrelationData = correlation.encode()
    return props


class PackedProperties(Properties):
    """PUBLISH properties already in wire form. paho only ever pack()s a publish's properties
    (again when it re-sends after a reconnect), and building a Properties costs more than the
    rest of a publish: its __init__ copies name tables, each property set searches them."""

    def __init__(self, packed: bytes) -> None:  # not Properties.__init__: what costs
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed

    def __str__(self) -> str:
        return f"PackedProperties({self.pack().hex()})"

    __repr__ = __str__


MAX_EXPIRY_S = 2**32 - 1  # a Four Byte Integer
# MQTT v5 property identifiers (section 2.2.2.2)
PROPERTY_EXPIRY, PROPERTY_RESPONSE_TOPIC, PROPERTY_CORRELATION = 0x02, 0x08, 0x09


@functools.cache
def _packed_template(kind: str) -> bytes:
    """_publish_template(kind) packed, without its length prefix."""
    packed = bytes(_publish_template(kind).pack())
    _, length_bytes = VariableByteIntegers.decode(packed)
    return packed[length_bytes:]


def packed_publish_properties(envelope: Envelope, *, now: float | None = None) -> Properties:
    """publish_properties(envelope), built as bytes (~2 µs, not ~35)."""
    body = _packed_template(envelope.kind.value)
    if envelope.expires_at is not None:
        remaining = envelope.expires_at - (time.time() if now is None else now)
        expiry = min(MAX_EXPIRY_S, max(1, math.ceil(remaining)))
        body += struct.pack("!BI", PROPERTY_EXPIRY, expiry)
    if envelope.reply_to is not None:
        body += _length_prefixed(PROPERTY_RESPONSE_TOPIC, envelope.reply_to.encode())
    correlation = envelope.correlation_id
    if correlation is None and envelope.reply_to is not None:
        correlation = envelope.message_id
    if correlation is not None:
        body += _length_prefixed(PROPERTY_CORRELATION, correlation.encode())
    return PackedProperties(bytes(VariableByteIntegers.encode(len(body))) + body)


def _length_prefixed(identifier: int, value: bytes) -> bytes:
    return struct.pack("!BH", identifier, len(value)) + value


def backoff_delay(
    attempt: int, *, base_s: float = 1.0, cap_s: float = 60.0, rng: random.Random | None = None
) -> float:
    """Exponential backoff with equal jitter: in [d/2, d] for d = min(cap, base * 2**attempt)."""
    if attempt < 0 or base_s <= 0 or cap_s < base_s:
        raise ValueError("need attempt >= 0 and 0 < base_s <= cap_s")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, 64))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def check_publish_size(payload: bytes, limit: int) -> int:
    """Return len(payload), or raise PublishTooLarge: paho does not check sizes client-side."""
    size = len(payload)
    if size > limit:
        raise PublishTooLarge(f"payload of {size} bytes is over the publish limit of {limit}")
    return size


# ---- errors that say what to do -------------------------------------------------------------
class BrokerUnreachable(ConnectionError):
    """The broker could not be reached or refused us; the message says what to check."""


def describe_connect_error(err: BaseException, settings: MqttSettings) -> str:
    """What went wrong connecting (refused, TLS, name, timeout) and what to check."""
    where = f"the MQTT broker at {settings.host}:{settings.port}"
    if isinstance(err, ConnectionRefusedError):
        return (
            f"cannot connect to {where}: connection refused (nothing listens on that port). "
            "Check that the broker runs (systemctl status mosquitto, docker compose ps) and "
            "that the host and port of the broker URL (--broker) are its listener's"
        )
    if isinstance(err, ssl.SSLCertVerificationError):
        reason = str(err.verify_message).rstrip(".")  # OpenSSL ends some reasons with a period
        return (
            f"TLS verification of {where} failed: certificate verify failed: "
            f"{reason}. Check that --tls-ca is the CA that signed the broker's "
            f"certificate ({settings.tls_ca or 'none given: the system CAs were used'}) and "
            f"that the certificate names the host {settings.host!r}"
        )
    if isinstance(err, ssl.SSLError):
        return (
            f"TLS handshake with {where} failed: {err.reason or err}. Check that the port is "
            "the broker's TLS listener (mqtts://) and that it accepts TLS 1.2 or later"
        )
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the broker host {settings.host!r}: {err.strerror}. Check the URL"
    if isinstance(err, TimeoutError):
        return (
            f"{where} did not answer in time. Check the host and port, and any firewall "
            "between this machine and the broker"
        )
    return f"cannot connect to {where}: {getattr(err, 'strerror', None) or err}"


def describe_refusal(reason_code: ReasonCode, settings: MqttSettings) -> str:
    """A refused CONNACK: its MQTT 5 reason code (paho maps 3.1.1's return codes onto them)
    and what to check."""
    said = f"MQTT 5 reason code {reason_code.value:#04x} {reason_code.getName()}"
    account = f"the account {settings.username!r}" if settings.username else "no account"
    advice = {
        0x86: f"the broker does not accept {account} with this password: check the user name "
        "(--username) and the password (--password-file) against the broker's password file",
        # mosquitto answers a wrong password or an unknown user with this one (MQTT 5)
        0x87: f"the broker does not let {account} connect: check the user name (--username) "
        "and the password (--password-file) against the broker's password file (a broker with "
        "allow_anonymous false needs both)",
        0x85: "the broker refuses the client id: with use_username_as_clientid, the user name "
        "must be a valid client id",
        0x84: "the broker does not speak this MQTT version: try --mqtt-version 3.1.1",
    }.get(reason_code.value, "see the broker's log")
    return f"{settings.url} refused the connection ({said}): {advice}"


def report_connect_failures(
    client: paho.Client, settings: MqttSettings, logger: logging.Logger
) -> None:
    """Log why each connection attempt fails: paho itself only reports "not connected".
    paho calls on_connect_fail inside its `except OSError` block (loop_forever), so the
    exception being handled is the one that failed the attempt."""
    attempts, last_reason = 0, ""  # attempts so far, the last reason logged

    def on_connect_fail(client: paho.Client, userdata: object) -> None:
        nonlocal attempts, last_reason
        err = sys.exc_info()[1]
        reason = describe_connect_error(err, settings) if err else "connection failed"
        attempts += 1
        if reason != last_reason:  # a new reason: loud; the same again: a reminder
            logger.error("%s (retrying with backoff)", reason)
        else:
            logger.warning("still cannot connect (attempt %d): %s", attempts, reason)
        last_reason = reason

    client.on_connect_fail = logged(on_connect_fail)


def probe_broker(settings: MqttSettings, timeout_s: float = 5.0) -> None:
    """Connect once and disconnect; BrokerUnreachable saying what to check if that fails."""
    result: list[ReasonCode] = []
    client = make_client(settings, f"skipfleet-probe-{random.getrandbits(48):012x}")
    client.on_connect = lambda client, userdata, flags, reason_code, props: result.append(
        reason_code
    )
    client.connect_timeout = timeout_s
    try:
        client.connect(settings.host, settings.port, keepalive=max(5, int(timeout_s)))
    except OSError as err:
        raise BrokerUnreachable(describe_connect_error(err, settings)) from None
    deadline = time.monotonic() + timeout_s
    try:
        while not result and time.monotonic() < deadline:
            client.loop(0.1)
    finally:
        client.disconnect()
    if not result:
        raise BrokerUnreachable(describe_connect_error(TimeoutError(), settings))
    if result[0].is_failure:
        raise BrokerUnreachable(describe_refusal(result[0], settings))
