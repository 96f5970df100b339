"""Round trips of every message kind through the envelope codec, and the validation rules."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import numpy as np
import pytest

from shared.protocol import (
    DEVICE_KINDS,
    DEVICE_SETTABLE,
    SCHEMA_VERSION,
    TERMINAL_STATES,
    AdapterPublication,
    ApplyAdapterParams,
    CancelParams,
    DecodeError,
    DesiredState,
    Envelope,
    FetchRequest,
    FinetuneParams,
    Heartbeat,
    Job,
    JobKind,
    JobReason,
    JobState,
    JobStatus,
    MessageKind,
    Presence,
    PresenceState,
    ProtocolError,
    Report,
    ReportMetrics,
    RollbackAdapterParams,
    adapter_wire_bytes,
    check_route,
    decode,
    encode,
    kind_of,
    topic_kind_for,
)
from shared.protocol.wire import unpack
from shared.topics import TopicKind
from tests.protocol_samples import BASE_HASH, assert_same, sample_messages


def _headers(message, seq=5):
    if kind_of(message) in DEVICE_KINDS:
        return {"boot_id": "boot-1", "seq": seq}
    return {}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_kind_round_trips(seed):
    messages = sample_messages(seed)
    assert {kind_of(m) for m in messages} == set(MessageKind)
    assert {m.kind for m in messages if isinstance(m, Job)} == set(JobKind)
    for message in messages:
        data = encode(message, sender="pi-07", **_headers(message))
        envelope = decode(data)
        assert envelope.kind is kind_of(message)
        assert envelope.sender == "pi-07"
        assert_same(envelope.message, message)


def test_envelope_headers_round_trip():
    request = FetchRequest(adapter_version=4)
    data = encode(
        request,
        sender="pi-07",
        boot_id="b-1",
        seq=42,
        expires_at=1.8e9,
        reply_to="fleet/pi-07/cmd/adapter",
        correlation_id="abc",
        sent_at=1.7e9,
        message_id="f" * 32,
    )
    envelope = decode(data)
    assert envelope == Envelope(
        request,
        sender="pi-07",
        message_id="f" * 32,
        sent_at=1.7e9,
        expires_at=1.8e9,
        reply_to="fleet/pi-07/cmd/adapter",
        correlation_id="abc",
        boot_id="b-1",
        seq=42,
    )
    assert envelope.dedup_key == ("pi-07", "b-1", 42)
    assert envelope.is_expired(now=1.9e9) and not envelope.is_expired(now=1.7e9)


def test_wire_form_is_a_plain_msgpack_map_with_schema_version():
    wire = msgpack.unpackb(encode(FetchRequest(1), sender="pi-1", boot_id="b", seq=0))
    assert wire["schema"] == SCHEMA_VERSION and wire["kind"] == "fetch"
    assert len(wire["id"]) == 32 and wire["body"] == {"adapter_version": 1}
    assert "reply_to" not in wire  # unset optional headers are left out


def test_message_ids_are_fresh_uuid4_hex():
    ids = {
        decode(encode(FetchRequest(1), sender="a", boot_id="b", seq=i)).message_id
        for i in range(50)
    }
    assert len(ids) == 50 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_device_messages_need_boot_id_and_seq():
    with pytest.raises(ValueError, match="boot_id and seq"):
        encode(FetchRequest(1), sender="pi-1")
    with pytest.raises(ValueError, match="go together"):
        encode(FetchRequest(1), sender="pi-1", boot_id="b")


def test_job_expiry_becomes_the_envelope_expiry():
    job = Job("j", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams(), expires_at=1234.5)
    assert decode(encode(job, sender="coordinator")).expires_at == 1234.5
    assert job.is_expired(now=1234.5) and not job.is_expired(now=1000)


def test_unknown_schema_version_is_a_clear_decode_error():
    wire = msgpack.unpackb(encode(FetchRequest(1), sender="a", boot_id="b", seq=0))
    wire["schema"] = 99
    with pytest.raises(DecodeError, match="unsupported schema version 99"):
        decode(msgpack.packb(wire))


def test_unknown_fields_are_ignored_for_forward_compatibility():
    wire = msgpack.unpackb(encode(FetchRequest(1), sender="a", boot_id="b", seq=0))
    wire["new_header"] = 1
    wire["body"]["new_field"] = [1, 2]
    assert decode(msgpack.packb(wire)).message == FetchRequest(1)


def _job_wire(**body_changes):
    job = Job("job-9", JobKind.FINETUNE, FinetuneParams(epochs=1, lr=0.01, seed=0), 2e9)
    wire = msgpack.unpackb(encode(job, sender="coordinator"))
    wire["body"].update(body_changes)
    return msgpack.packb(wire)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": "reboot"}, JobReason.UNKNOWN_KIND),
        ({"params": {"epochs": 0}}, JobReason.INVALID_PARAMS),
        ({"params": {"epochs": 1, "lr": "fast"}}, JobReason.INVALID_PARAMS),
        ({"expires_at": -1.0}, JobReason.MALFORMED),
        ({"kind": "cancel", "params": {}}, JobReason.INVALID_PARAMS),
        ({"kind": "cancel", "params": {"target_job_id": "no spaces"}}, JobReason.INVALID_PARAMS),
        ({"kind": "cancel", "params": {"target_job_id": 17}}, JobReason.INVALID_PARAMS),
    ],
)
def test_bad_jobs_carry_their_id_and_a_rejection_reason(change, reason):
    with pytest.raises(DecodeError) as info:
        decode(_job_wire(**change))
    assert info.value.job_id == "job-9" and info.value.job_reason is reason


def test_job_without_readable_id_has_no_rejection_context():
    with pytest.raises(DecodeError) as info:
        decode(_job_wire(job_id="bad id!"))
    assert info.value.job_id is None


def test_job_state_sets():
    assert {JobState.IN_PROGRESS, JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED} == set(
        DEVICE_SETTABLE
    )
    assert JobState.QUEUED not in TERMINAL_STATES and JobState.IN_PROGRESS not in TERMINAL_STATES
    assert {s for s in JobState if s not in TERMINAL_STATES} == {
        JobState.QUEUED,
        JobState.IN_PROGRESS,
    }
    assert JobStatus("j", JobState.FAILED).terminal


@pytest.mark.parametrize("state", sorted(set(JobState) - DEVICE_SETTABLE))
def test_devices_cannot_set_coordinator_states(state):
    with pytest.raises(ValueError, match="may not set"):
        JobStatus("j", state)


def test_rejection_needs_a_reason_code():
    with pytest.raises(ValueError, match="reason_code"):
        JobStatus("j", JobState.REJECTED, reason="no")


def _base_metrics(**changes):
    values = dict(
        accuracy_before=0.5,
        accuracy_after=0.6,
        samples=10,
        epochs=1,
        finetune_seconds=1.0,
        joules=1.0,
        power_source="rapl",
        cache_hit_rate=0.5,
        base_model_hash=BASE_HASH,
        method="skip2-lora",
        rank=4,
    )
    return ReportMetrics(**{**values, **changes})


@pytest.mark.parametrize(
    "build",
    [
        lambda: _base_metrics(accuracy_after=1.5),
        lambda: _base_metrics(samples=0),
        lambda: _base_metrics(power_source="battery"),
        lambda: _base_metrics(joules=float("nan")),
        lambda: _base_metrics(rank=True),
        lambda: Heartbeat(-1.0, "rapl", 0.0, 0, 0, 0, 0.0),
        lambda: Heartbeat(1.0, "model:", 0.0, 0, 0, 0, 0.0),
        lambda: Heartbeat(1.0, "hwmon:INA226", 0.0, 0, 0, 0, 0.0),
        lambda: Heartbeat(1.0, "hwmon:ina 226", 0.0, 0, 0, 0, 0.0),
        lambda: Heartbeat(1.0, "battery:ina226", 0.0, 0, 0, 0, 0.0),
        lambda: Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, drifted=1),
        lambda: CancelParams(target_job_id=""),
        lambda: Job("j", JobKind.CANCEL, RollbackAdapterParams(), 1.0),
        lambda: FinetuneParams(epochs=1, lr=0.0, seed=0),
        lambda: FinetuneParams(epochs=1, lr=0.1, seed=0, method="Skip LoRA"),
        lambda: Job("j", JobKind.FINETUNE, RollbackAdapterParams(), 1.0),
        lambda: Presence("online", "b", "v", BASE_HASH, "c"),
        lambda: Presence(PresenceState.ONLINE, "b", "v", BASE_HASH, "c", device={"x": [1]}),
        lambda: JobStatus("j", JobState.SUCCEEDED, progress=1.01),
        lambda: Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, signature=np.zeros(4, np.float32)),
        lambda: Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, signature_rows=4),
        lambda: Heartbeat(
            1.0, "rapl", 0.0, 0, 0, 0, 0.0, signature=np.full(3, np.nan), signature_rows=1
        ),
        lambda: Heartbeat(
            1.0, "rapl", 0.0, 0, 0, 0, 0.0, signature=np.zeros((2, 2)), signature_rows=1
        ),
        lambda: Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, confidence_score=-0.1),
        lambda: Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, adapter_origin="fleet"),
        lambda: FinetuneParams(epochs=1, lr=0.1, seed=0, steps=0),
        lambda: FinetuneParams(epochs=1, lr=0.1, seed=0, start_version=-1),
        lambda: _base_metrics(accuracy_running=1.2),
        lambda: _base_metrics(installed=1),
        lambda: Presence(PresenceState.ONLINE, "b", "v", BASE_HASH, "c", train_samples=-1),
    ],
)
def test_construction_validates(build):
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize(
    "source", ["ina219", "rapl", "hwmon", "hwmon:ina226", "hwmon:ina219", "model", "model:generic"]
)
def test_power_sources_name_the_sensor_and_optionally_the_chip_or_profile(source):
    beat = Heartbeat(1.0, source, 0.0, 0, 0, 0, 0.0)
    assert decode(encode(beat, sender="pi-1", boot_id="b", seq=0)).message == beat


def test_cancel_job_round_trips_with_its_target():
    job = Job("c-1", JobKind.CANCEL, CancelParams(target_job_id="ft-9"), expires_at=2e9)
    wire = msgpack.unpackb(encode(job, sender="coordinator"))
    assert wire["body"]["kind"] == "cancel"
    assert wire["body"]["params"] == {"target_job_id": "ft-9"}
    assert decode(msgpack.packb(wire)).message == job


def test_drifted_is_optional_in_a_heartbeat_and_must_be_a_bool_on_the_wire():
    beat = Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, drifted=True)
    wire = msgpack.unpackb(encode(beat, sender="pi-1", boot_id="b", seq=0))
    assert decode(msgpack.packb(wire)).message.drifted is True
    del wire["body"]["drifted"]  # a sender that predates the field
    assert decode(msgpack.packb(wire)).message.drifted is None
    wire["body"]["drifted"] = 1
    with pytest.raises(DecodeError, match="drifted"):
        decode(msgpack.packb(wire))


def test_a_heartbeat_clock_offset_round_trips_and_an_older_heartbeat_without_it_decodes():
    beat = Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, clock_offset_s=-3600.25)
    wire = msgpack.unpackb(encode(beat, sender="pi-1", boot_id="b", seq=0))
    assert decode(msgpack.packb(wire)).message.clock_offset_s == -3600.25
    del wire["body"]["clock_offset_s"]  # an agent that predates the field
    assert decode(msgpack.packb(wire)).message.clock_offset_s is None
    wire["body"]["clock_offset_s"] = float("nan")
    with pytest.raises(DecodeError, match="clock_offset_s"):
        decode(msgpack.packb(wire))


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FetchRequest(1).adapter_version = 2


def test_decode_error_is_a_protocol_error():
    assert issubclass(DecodeError, ProtocolError)
    with pytest.raises(ProtocolError):
        decode(b"\xc1")


def test_oversized_payload_is_refused_before_unpacking():
    data = encode(FetchRequest(1), sender="a", boot_id="b", seq=0)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode(data, max_bytes=len(data) - 1)


def test_routing_pairs_kinds_with_topics():
    assert topic_kind_for(MessageKind.REPORT) is TopicKind.REPORT
    assert topic_kind_for(MessageKind.JOB) is TopicKind.CMD_JOB
    with pytest.raises(ValueError):
        topic_kind_for(MessageKind.CHUNK)
    fetch = decode(encode(FetchRequest(1), sender="pi-1", boot_id="b", seq=0))
    check_route("pi-1", TopicKind.FETCH, fetch)
    with pytest.raises(DecodeError, match="does not belong"):
        check_route("pi-1", TopicKind.REPORT, fetch)
    with pytest.raises(DecodeError, match="published on the topic of"):
        check_route("pi-2", TopicKind.FETCH, fetch)


def test_decoded_arrays_are_float32_and_usable():
    report = next(m for m in sample_messages(3) if isinstance(m, Report))
    decoded = decode(encode(report, sender="pi-1", boot_id="b", seq=1)).message
    for name, array in decoded.adapter.items():
        assert array.dtype == np.float32 and array.flags.writeable, name


def test_sent_at_defaults_to_now():
    before = time.time()
    envelope = decode(encode(FetchRequest(1), sender="a", boot_id="b", seq=0))
    assert before <= envelope.sent_at <= time.time()


def test_fields_added_for_federation_default_when_an_older_sender_leaves_them_out():
    """A device or coordinator that predates a field still talks: optional fields stay None."""
    beat = Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0)
    wire = msgpack.unpackb(encode(beat, sender="pi-1", boot_id="b", seq=0))
    for key in ("confidence_score", "feature_score", "signature", "signature_rows"):
        del wire["body"][key]
    decoded = decode(msgpack.packb(wire)).message
    assert (decoded.confidence_score, decoded.signature, decoded.adapter_origin) == (None,) * 3
    job = Job("a-1", JobKind.APPLY_ADAPTER, ApplyAdapterParams(3, only_if_better=True), 2e9)
    wire = msgpack.unpackb(encode(job, sender="coordinator"))
    del wire["body"]["params"]["only_if_better"]
    assert decode(msgpack.packb(wire)).message.params.only_if_better is False


def test_a_float16_signature_arrives_as_float32_and_a_labelless_presence_says_so():
    signature = np.linspace(-2, 2, 96).astype(np.float16)
    beat = Heartbeat(1.0, "rapl", 0.0, 0, 0, 0, 0.0, signature=signature, signature_rows=64)
    decoded = decode(encode(beat, sender="pi-1", boot_id="b", seq=0)).message
    assert decoded.signature.dtype == np.float32
    np.testing.assert_array_equal(decoded.signature, signature.astype(np.float32))
    unlabelled = Presence(
        PresenceState.ONLINE, "b", "v", BASE_HASH, "c", train_samples=0, holdout_samples=0
    )
    assert unlabelled.labelled is False
    assert Presence(PresenceState.ONLINE, "b", "v", BASE_HASH, "c").labelled is None


def _pointer(**fields):
    base = {"adapter_version": 3, "base_model_hash": BASE_HASH, "cohort": "x"}
    return DesiredState(**(base | fields))


def test_a_pointer_that_offers_a_version_is_that_apply_job_and_a_plain_one_is_none():
    offer = _pointer(only_if_better=True, job_id="job-9", expires_at=2e9)
    job = offer.apply_job()
    assert job is not None and (job.job_id, job.kind, job.expires_at) == (
        "job-9",
        JobKind.APPLY_ADAPTER,
        2e9,
    )
    assert job.params == ApplyAdapterParams(3, only_if_better=True)
    assert job.base_model_hash == BASE_HASH
    assert _pointer().apply_job() is None


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"job_id": "job-9"}, "come together"),
        ({"expires_at": 2e9}, "come together"),
        ({"adapter_version": None, "job_id": "job-9", "expires_at": 2e9}, "adapter_version"),
        ({"adapter": "arrays"}, "AdapterPublication"),
    ],
)
def test_a_malformed_offer_is_refused_at_construction(fields, says):
    with pytest.raises(ValueError, match=says):
        _pointer(**fields)


def test_an_inline_adapter_must_be_the_version_and_base_model_the_pointer_names():
    (publication,) = [m for m in sample_messages(0) if isinstance(m, AdapterPublication)]
    with pytest.raises(ValueError, match="not 3"):
        _pointer(adapter=publication)
    other = dataclasses.replace(publication, version=3, base_model_hash="c" * 64)
    with pytest.raises(ValueError, match="another base model"):
        _pointer(adapter=other)
    inline = _pointer(adapter=dataclasses.replace(publication, version=3))
    assert adapter_wire_bytes(inline.adapter) < len(encode(inline, sender="coordinator"))


def test_a_pointer_from_an_older_coordinator_decodes_as_a_plain_pointer():
    wire = unpack(encode(_pointer(), sender="coordinator"), max_bytes=4096)
    for name in ("adapter", "job_id", "expires_at"):
        assert name not in wire["body"]  # left out when unset: older agents read it as before
    decoded = decode(encode(_pointer(), sender="coordinator")).message
    assert decoded == _pointer() and decoded.adapter is None and decoded.apply_job() is None
