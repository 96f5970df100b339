"""A fleet adapter sent inline in many devices' pointers is converted to its wire form once."""

from __future__ import annotations

import gc

import numpy as np

from shared.protocol import AdapterPublication, DesiredState, Lineage, codec, decode, encode
from tests.protocol_samples import BASE_HASH, adapter_arrays


def publication(seed: int) -> AdapterPublication:
    arrays = adapter_arrays(np.random.default_rng(seed))
    return AdapterPublication(4, BASE_HASH, "fan", arrays, Lineage("r-1", ("pi-1",), "fedavg"), 1.0)


def test_one_publication_in_many_pointers_is_converted_once(monkeypatch):
    calls = []
    original = codec.compress_arrays
    monkeypatch.setattr(codec, "compress_arrays", lambda *a: calls.append(1) or original(*a))
    adapter = publication(0)
    pointer = DesiredState(4, BASE_HASH, "fan", adapter=adapter)
    payloads = [encode(pointer, sender="coord") for _ in range(3)]
    assert len(calls) == 1
    for payload in payloads:
        sent = decode(payload).message.adapter
        assert all(np.array_equal(sent.arrays[k], adapter.arrays[k]) for k in adapter.arrays)


def test_another_publication_is_converted_anew_and_a_dropped_one_forgotten():
    first, second = publication(1), publication(2)
    one, two = encode(first, sender="coord"), encode(second, sender="coord")
    assert decode(one).message.arrays["A1"].tolist() != decode(two).message.arrays["A1"].tolist()
    held = len(codec._ADAPTER_WIRE)
    del first
    gc.collect()
    assert len(codec._ADAPTER_WIRE) == held - 1
