"""Chunking: every piece under the limit, reassembly in any order with duplicates, resume by
index, sha256 verification, and the reassembler's memory and time bounds."""

from __future__ import annotations

import hashlib
import random

import msgpack
import numpy as np
import pytest

from shared.protocol import (
    DEFAULT_CHUNK_LIMIT,
    AdapterPublication,
    Chunk,
    DecodeError,
    EncodeError,
    Envelope,
    FetchRequest,
    Lineage,
    Reassembler,
    ReassemblyError,
    SenderReassemblers,
    decode,
    encode,
    encode_envelope,
    encode_for_publish,
    new_envelope,
    split_envelope,
)
from tests.protocol_samples import BASE_HASH, adapter_arrays, assert_same


def big_publication(seed: int, rows: int = 8000) -> AdapterPublication:
    arrays = adapter_arrays(np.random.default_rng(seed), dims=(rows, 96, 96), rank=8)
    return AdapterPublication(
        7, BASE_HASH, "fan-a", arrays, Lineage("round-1", ("pi-1",), "fedavg"), 1.7e9
    )


def chunk_of(payload: bytes) -> Chunk:
    return decode(payload).message


@pytest.fixture(scope="module")
def publication():
    return big_publication(0)


@pytest.fixture(scope="module")
def outgoing(publication):
    return encode_for_publish(publication, sender="coordinator", expires_at=2e9)


def test_large_messages_are_split_under_the_limit(outgoing):
    assert len(outgoing) >= 3  # the tests below hold back a first and a last chunk
    assert all(len(item.payload) <= DEFAULT_CHUNK_LIMIT for item in outgoing)
    chunks = [chunk_of(item.payload) for item in outgoing]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.total for c in chunks} == {len(chunks)} and len({c.sha256 for c in chunks}) == 1
    assert all(item.envelope.expires_at == 2e9 for item in outgoing)  # brokers drop stale pieces


def test_small_messages_travel_whole():
    [item] = encode_for_publish(FetchRequest(3), sender="pi-1", boot_id="b", seq=1)
    assert decode(item.payload).message == FetchRequest(3)


@pytest.mark.parametrize("seed", [0, 1])
def test_reassembly_out_of_order_with_duplicates(publication, outgoing, seed):
    shuffled = [item.payload for item in outgoing] * 2
    random.Random(seed).shuffle(shuffled)
    reassembler = Reassembler()
    done = [env for env in (reassembler.feed(decode(p)) for p in shuffled) if env is not None]
    assert len(done) == 1  # duplicates after completion are ignored, not re-delivered
    assert done[0].message_id == outgoing[0].envelope.message.message_id
    assert_same(done[0].message, publication)
    assert reassembler.in_flight == [] and reassembler.buffered_bytes == 0


def test_missing_chunks_are_reported_and_can_be_resent(outgoing):
    reassembler = Reassembler()
    chunks = [chunk_of(item.payload) for item in outgoing]
    held_back = {0, len(chunks) - 1}
    for chunk in chunks:
        if chunk.index not in held_back:
            assert reassembler.add(chunk) is None
    message_id = chunks[0].message_id
    assert reassembler.missing(message_id) == sorted(held_back)
    assert reassembler.add(chunks[0]) is None
    assert reassembler.add(chunks[-1]) is not None
    with pytest.raises(KeyError):
        reassembler.missing(message_id)


def test_corrupted_chunk_fails_the_sha256_check_and_a_resend_recovers(outgoing):
    chunks = [chunk_of(item.payload) for item in outgoing]
    bad = chunks[1]
    flipped = bytes([bad.data[0] ^ 0xFF]) + bad.data[1:]
    corrupted = Chunk(bad.message_id, bad.index, bad.total, bad.sha256, flipped)
    reassembler = Reassembler()
    with pytest.raises(ReassemblyError, match="sha256"):
        for chunk in [chunks[0], corrupted, *chunks[2:]]:
            reassembler.add(chunk)
    assert reassembler.in_flight == []
    results = [reassembler.add(chunk) for chunk in chunks]
    assert results[-1] is not None and results[:-1] == [None] * (len(chunks) - 1)


def test_chunks_that_disagree_are_refused(outgoing):
    first, second = (chunk_of(item.payload) for item in outgoing[:2])
    reassembler = Reassembler()
    reassembler.add(first)
    liar = Chunk(second.message_id, second.index, second.total + 1, second.sha256, second.data)
    with pytest.raises(ReassemblyError, match="disagree"):
        reassembler.add(liar)
    assert reassembler.in_flight == []


def test_chunks_carrying_another_message_are_refused():
    inner = encode(FetchRequest(1), sender="pi-1", boot_id="b", seq=1)
    chunk = Chunk("a" * 32, 0, 1, hashlib.sha256(inner).digest(), inner)
    with pytest.raises(ReassemblyError, match="different message"):
        Reassembler().feed(new_envelope(chunk, sender="pi-1"))


def _pieces(seed: int, limit: int = 2048) -> list[Chunk]:
    publication = big_publication(seed, rows=40)
    return [chunk_of(i.payload) for i in encode_for_publish(publication, sender="c", limit=limit)]


def test_in_flight_messages_are_bounded_oldest_dropped():
    reassembler = Reassembler(max_in_flight=2)
    streams = [_pieces(seed) for seed in range(3)]
    for stream in streams:
        reassembler.add(stream[0])
    assert reassembler.in_flight == [streams[1][0].message_id, streams[2][0].message_id]
    assert reassembler.dropped == 1


def test_total_bytes_are_bounded():
    streams = [_pieces(seed) for seed in range(2)]
    budget = sum(len(c.data) for c in streams[0][:3])
    reassembler = Reassembler(max_total_bytes=budget)
    for chunk in streams[0][:3]:
        reassembler.add(chunk)
    reassembler.add(streams[1][0])  # makes room by dropping the older message
    assert reassembler.in_flight == [streams[1][0].message_id]
    assert reassembler.buffered_bytes <= budget


def test_a_message_over_the_size_limit_is_refused():
    stream = _pieces(0)
    reassembler = Reassembler(max_message_bytes=len(stream[0].data) * 2)
    reassembler.add(stream[0])
    reassembler.add(stream[1])
    with pytest.raises(ReassemblyError, match="exceeds"):
        reassembler.add(stream[2])
    assert reassembler.in_flight == []


def test_partial_messages_expire():
    now = [100.0]
    reassembler = Reassembler(ttl_s=10, clock=lambda: now[0])
    stream = _pieces(0)
    reassembler.add(stream[0])
    now[0] = 109.0
    assert reassembler.expire() == []
    now[0] = 110.0
    assert reassembler.expire() == [stream[0].message_id]
    assert reassembler.buffered_bytes == 0


@pytest.mark.parametrize("limit", [300, 1000, 4096])
def test_any_reasonable_limit_is_respected(limit):
    publication = big_publication(1, rows=20)
    items = encode_for_publish(publication, sender="coordinator", limit=limit, reply_to="r/x")
    assert len(items) > 1 and all(len(item.payload) <= limit for item in items)
    reassembler = Reassembler()
    [envelope] = [e for e in (reassembler.feed(decode(i.payload)) for i in items) if e]
    assert envelope.reply_to == "r/x"  # reply routing rides on the inner envelope
    assert_same(envelope.message, publication)


def test_too_small_a_limit_or_too_many_chunks():
    publication = big_publication(0, rows=20)
    with pytest.raises(ValueError, match="no room"):
        encode_for_publish(publication, sender="coordinator", limit=100)
    envelope = new_envelope(FetchRequest(1), sender="pi-1", boot_id="b", seq=1)
    with pytest.raises(EncodeError, match="chunks"):
        split_envelope(envelope, bytes(4096 * 200), limit=300)


def test_a_decode_error_from_a_hostile_chunk_payload():
    wire = msgpack.unpackb(encode(Chunk("b" * 32, 0, 1, bytes(32), b"x"), sender="pi-1"))
    wire["body"]["index"] = 5
    with pytest.raises(DecodeError):
        decode(msgpack.packb(wire))


def chunk_starts(sender: str, count: int, limit: int = 300) -> list[Envelope]:
    """The first chunk of `count` different large messages from one sender."""
    out = []
    for i in range(count):
        big = new_envelope(FetchRequest(i), sender=sender, boot_id="b", seq=i)
        pieces = split_envelope(big, encode_envelope(big) + bytes(3 * limit), limit=limit)
        out.append(pieces[0].envelope)
    return out


def test_one_senders_chunk_starts_never_evict_another_senders_message(outgoing):
    reassemblers = SenderReassemblers(per_sender_in_flight=4)
    victim = [item.envelope for item in outgoing]
    assert reassemblers.feed(victim[0]) is None  # pi-1's message is half in
    for envelope in chunk_starts("flooder", 100):  # 100 partial messages from one device
        assert reassemblers.feed(envelope) is None
    assert len(reassemblers.in_flight("flooder")) == 4  # it evicted only its own
    done = [reassemblers.feed(e) for e in victim[1:]]
    assert done[-1] is not None and done[-1].message_id == victim[0].message.message_id
    assert reassemblers.in_flight(victim[0].sender) == []  # completed: nothing kept for it
    assert reassemblers.dropped == 96


def test_the_global_byte_cap_evicts_from_the_sender_holding_the_most(outgoing):
    victim = [item.envelope for item in outgoing]
    one_chunk = len(victim[0].message.data)
    reassemblers = SenderReassemblers(per_sender_in_flight=50,
                                      max_total_bytes=3 * one_chunk)  # fmt: skip
    reassemblers.feed(victim[0])
    for envelope in chunk_starts("hog", 10, limit=one_chunk + 200):
        reassemblers.feed(envelope)
        assert reassemblers.buffered_bytes <= 3 * one_chunk
    assert reassemblers.in_flight(victim[0].sender) == [victim[0].message.message_id]
