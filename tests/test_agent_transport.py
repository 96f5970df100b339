"""The paho wiring without a broker: callback guards, CONNACK refusals, PUBACK outcomes."""

from __future__ import annotations

import logging

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerRefused, ExitCode
from agent.outbox import Outbox
from agent.spool import Priority, Spool
from agent.transport import Transport, logged
from shared.mqtt import MqttSettings, Will


class Flags:
    session_present = False


@pytest.fixture
def wired(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=10)
    fatal: list[BrokerRefused] = []
    transport = Transport(
        MqttSettings("127.0.0.1", 1),
        client_id="dev-1",
        subscriptions=[("fleet/dev-1/cmd/job", 1)],
        status_topic="fleet/dev-1/status",
        will=Will("fleet/dev-1/status", b"offline"),
        online_payload=lambda: b"online",
        outbox=Outbox(spool, lambda item: 1, retry_after_seconds=0.0),
        on_message=lambda topic, payload, retained: None,
        on_fatal=fatal.append,
    )
    transport.handoff.start()
    yield transport, spool, fatal
    transport.handoff.stop()
    spool.close()


def test_logged_callbacks_never_raise(caplog):
    @logged
    def broken(*args):
        raise KeyError("boom")

    with caplog.at_level(logging.ERROR):
        broken(1, 2)
    assert "broken failed" in caplog.text


@pytest.mark.parametrize(("code", "is_fatal"), [(0x86, True), (0x87, True), (0x88, False)])
def test_refused_credentials_are_fatal_other_refusals_are_retried(wired, code, is_fatal):
    transport, _, fatal = wired
    transport._client.on_connect(
        transport._client, None, Flags(), ReasonCode(PacketTypes.CONNACK, identifier=code), None
    )
    assert bool(fatal) is is_fatal and not transport.connected.is_set()
    if is_fatal:
        assert fatal[0].exit_code is ExitCode.BROKER_REFUSED


def test_puback_outcomes_settle_or_keep_the_spooled_row(wired):
    transport, spool, _ = wired
    outbox = transport._outbox
    outbox.connected()
    spool.put("fleet/dev-1/job", b"a", priority=Priority.RECORD)
    assert outbox.pump() == 1  # the fake publish hands out mid 1
    quota = ReasonCode(PacketTypes.PUBACK, identifier=0x97)
    transport._client.on_publish(transport._client, None, 1, quota, None)
    assert transport.handoff.drain()
    assert spool.stats().depth == 1  # quota exceeded: kept for a later retry
    assert outbox.pump() == 1  # paho forgot it: handed over again (retry time 0 here)
    ok = ReasonCode(PacketTypes.PUBACK, identifier=0x10)  # "no matching subscribers" is a success
    transport._client.on_publish(transport._client, None, 1, ok, None)
    assert transport.handoff.drain()
    assert spool.stats().depth == 0


def test_pahos_not_connected_error_is_kept_out_of_the_agent_log_other_paho_errors_are_not(caplog):
    from agent.transport import PAHO_LOG

    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.enable_logger(PAHO_LOG)
    with caplog.at_level(logging.DEBUG, logger="paho"):
        client.loop(timeout=0.01)  # no socket: paho's "Client is not connected ..." at ERROR
        PAHO_LOG.error("some other paho error")
    said = [r.getMessage() for r in caplog.records if r.name == "paho"]
    assert said == ["some other paho error"]
