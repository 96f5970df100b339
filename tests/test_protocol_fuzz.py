"""Hostile input: whatever bytes arrive, the decoder returns an Envelope or raises DecodeError.

Property tests throw random bytes, random msgpack structures and mutated valid envelopes at it;
the fixed cases are the classic hostile headers (huge length prefixes, deep nesting, ext types).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.protocol import (
    DEVICE_KINDS,
    Chunk,
    DecodeError,
    Envelope,
    MessageKind,
    Reassembler,
    ReassemblyError,
    decode,
    decompress_arrays,
    encode,
    kind_of,
    new_envelope,
)
from shared.protocol.arrays import array_from_wire
from tests.protocol_samples import sample_messages

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(data: object) -> None:
    try:
        envelope = decode(data)
    except DecodeError:
        return
    assert isinstance(envelope, Envelope)


def _valid_wires() -> list[dict]:
    wires = []
    for message in sample_messages(0):
        headers = {"boot_id": "b", "seq": 1} if kind_of(message) in DEVICE_KINDS else {}
        data = encode(message, sender="pi-1", expires_at=2e9, reply_to="a/b", **headers)
        wires.append(msgpack.unpackb(data))
    return wires


VALID_WIRES = _valid_wires()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=48)
)
structures = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), children, max_size=4)
    ),
    max_leaves=24,
)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decodes_or_refuses(data)


@FUZZ
@given(structures)
def test_random_msgpack_structures(obj):
    decodes_or_refuses(msgpack.packb(obj, use_bin_type=True))


@FUZZ
@given(st.sampled_from(list(MessageKind)), structures)
def test_random_bodies_behind_a_valid_header(kind, body):
    wire = {"schema": 1, "kind": kind.value, "id": "a" * 32, "sender": "pi-1", "sent_at": 1.0}
    wire |= {"boot_id": "b", "seq": 1, "body": body}
    decodes_or_refuses(msgpack.packb(wire, use_bin_type=True))


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += _paths(value, (*prefix, index))
    return found


@FUZZ
@given(st.data())
def test_mutated_valid_envelopes(data):
    wire = copy.deepcopy(data.draw(st.sampled_from(VALID_WIRES)))
    path = data.draw(st.sampled_from(_paths(wire)))
    parent = wire
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(structures)
    decodes_or_refuses(msgpack.packb(wire, use_bin_type=True))


@FUZZ
@given(st.data())
def test_truncated_and_bit_flipped_envelopes(data):
    payload = bytearray(msgpack.packb(data.draw(st.sampled_from(VALID_WIRES))))
    cut = data.draw(st.integers(0, len(payload)))
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] ^= data.draw(st.integers(1, 255))
    decodes_or_refuses(bytes(payload))
    decodes_or_refuses(bytes(payload[:cut]))


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["<f4", "|i1", ">f4", "|O", "<U8", "V4", "f4"]) | scalars,
            "shape": st.lists(st.integers(-5, 2**40) | scalars, max_size=6) | scalars,
            "data": st.binary(max_size=64) | scalars,
            "scale": structures,
        },
    )
)
def test_random_array_headers(wire):
    for packed in (
        {"encoding": "float32", "arrays": {"A1": wire}},
        {"encoding": "int8", "arrays": {"A1": wire}},
    ):
        with contextlib.suppress(DecodeError):
            decompress_arrays(packed)
    with contextlib.suppress(DecodeError):
        array_from_wire(wire)


@st.composite
def chunk_streams(draw):
    """Chunks of a few messages: some honest, some with wrong hashes, totals or data."""
    chunks = []
    for message_id in draw(st.lists(st.sampled_from(["a" * 32, "b" * 32, "c" * 32]), max_size=3)):
        payload = draw(st.binary(min_size=1, max_size=40))
        total = draw(st.integers(1, min(4, len(payload))))
        digest = draw(st.sampled_from([hashlib.sha256(payload).digest(), bytes(32)]))
        step = -(-len(payload) // total)
        pieces = [payload[i : i + step] for i in range(0, len(payload), step)]
        for index, piece in enumerate(pieces):
            claimed = draw(st.sampled_from([len(pieces), len(pieces) + 1]))
            chunks.append(Chunk(message_id, index, max(claimed, index + 1), digest, piece))
    return draw(st.permutations(chunks))


@FUZZ
@given(chunk_streams())
def test_reassembler_raises_only_reassembly_or_decode_errors(chunks):
    reassembler = Reassembler(max_in_flight=2, max_total_bytes=64)
    for chunk in chunks:
        with contextlib.suppress(ReassemblyError, DecodeError):
            reassembler.feed(new_envelope(chunk, sender="pi-1"))
        assert reassembler.buffered_bytes <= 64 and len(reassembler.in_flight) <= 2


def _envelope_with(body_kind: str, body: object) -> bytes:
    wire = {"schema": 1, "kind": body_kind, "id": "a" * 32, "sender": "pi-1", "sent_at": 1.0}
    return msgpack.packb(wire | {"boot_id": "b", "seq": 1, "body": body}, use_bin_type=True)


HUGE_ARRAY = {"dtype": "<f4", "shape": [2**31], "data": b""}
HOSTILE = {
    "array32 header of 2**31 items": b"\xdd\x80\x00\x00\x00",
    "map32 header of 2**31 pairs": b"\xdf\x80\x00\x00\x00",
    "bin32 of 4 GiB": b"\xc6\xff\xff\xff\xff",
    "str32 of 2 GiB": b"\xdb\x80\x00\x00\x00",
    "100k nested arrays": b"\x91" * 100_000 + b"\xc0",
    "50k nested maps": b"\x81\xa1k" * 50_000 + b"\xc0",
    "ext type 1": b"\xd4\x01\x00",
    "ext8 of length 0": b"\xc7\x00\x05",
    "timestamp ext": b"\xd6\xff\x00\x00\x00\x01",
    "bad timestamp ext": b"\xc7\x03\xff\x00\x00\x00",
    "reserved byte 0xc1": b"\xc1",
    "empty": b"",
    "trailing bytes": msgpack.packb(VALID_WIRES[0]) + b"\x00",
    "invalid utf-8 string": b"\xa2\xff\xfe",
    "integer map key": b"\x81\x01\x01",
    "list map key": b"\x81\x91\x01\x01",
    "repeated key": b"\x82\xa1a\x01\xa1a\x02",
    "ext inside a body": _envelope_with("fetch", {"adapter_version": msgpack.ExtType(5, b"x")}),
    "timestamp as sent_at": msgpack.packb(
        {**VALID_WIRES[0], "sent_at": msgpack.Timestamp(1, 0)}, datetime=False
    ),
    "NaN timestamp": msgpack.packb({**VALID_WIRES[0], "sent_at": float("nan")}),
    "seq over int64": msgpack.packb({**VALID_WIRES[0], "seq": 2**64 - 1}),
    "bool as seq": msgpack.packb({**VALID_WIRES[0], "seq": True}),
    "bytes as kind": msgpack.packb({**VALID_WIRES[0], "kind": b"presence"}, use_bin_type=True),
    "schema missing": msgpack.packb({k: v for k, v in VALID_WIRES[0].items() if k != "schema"}),
    "2**31-element array shape": _envelope_with(
        "report",
        {"job_id": "j", "adapter": {"encoding": "float32", "arrays": {"A1": HUGE_ARRAY}}},
    ),
    "object dtype": _envelope_with(
        "adapter",
        {"arrays": {"encoding": "float32", "arrays": {"A1": {**HUGE_ARRAY, "dtype": "|O"}}}},
    ),
    "shape and data disagree": _envelope_with(
        "adapter",
        {"arrays": {"encoding": "float32", "arrays": {"A1": {**HUGE_ARRAY, "shape": [3]}}}},
    ),
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_payloads_are_decode_errors(payload):
    with pytest.raises(DecodeError):
        decode(payload)


@pytest.mark.parametrize("payload", [None, "text", 42, memoryview(b"\x80")])
def test_non_bytes_are_decode_errors(payload):
    with pytest.raises(DecodeError):
        decode(payload)
