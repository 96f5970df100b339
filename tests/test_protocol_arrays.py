"""Arrays on the wire: the allow-list, the shape/byte checks, and the lossy adapter encodings."""

from __future__ import annotations

import numpy as np
import pytest

from shared.protocol import (
    ALLOWED_DTYPES,
    AdapterPublication,
    ArrayEncoding,
    DecodeError,
    EncodeError,
    Lineage,
    array_from_wire,
    array_to_wire,
    compress_arrays,
    decode,
    decompress_arrays,
    encode,
)
from tests.protocol_samples import BASE_HASH, adapter_arrays


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype):
    rng = np.random.default_rng(7)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    wire = array_to_wire(array)
    assert wire["dtype"] == dtype and wire["shape"] == [3, 4, 5]
    back = array_from_wire(wire)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype and not back.flags.writeable


def test_big_endian_and_non_contiguous_arrays_are_sent_little_endian():
    array = np.arange(12, dtype=">f4").reshape(3, 4).T
    wire = array_to_wire(array)
    assert wire["dtype"] == "<f4"
    np.testing.assert_array_equal(array_from_wire(wire), array)


class Tagged(np.ndarray):
    """An ndarray subclass (as a caller's own may be)."""


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),  # the common case: C order
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # Fortran order
        np.arange(24, dtype=np.float32).reshape(4, 6)[::2, 1:5],  # a strided view
        np.arange(6, dtype=np.float32).view(Tagged),
        np.array(2.5, np.float32),  # 0-d
        np.zeros((0, 4), np.float32),
    ],
)
def test_float32_arrays_of_every_layout_give_the_one_wire_map(array):
    expected = {
        "dtype": "<f4",
        "shape": list(array.shape),
        "data": np.ascontiguousarray(array).tobytes(),
    }
    assert array_to_wire(array) == expected
    np.testing.assert_array_equal(array_from_wire(array_to_wire(array)), array)


@pytest.mark.parametrize(
    "array",
    [
        np.array(["a"], dtype=object),
        np.array([True]),
        np.array([1j]),
        np.zeros((1,) * 5),
        np.zeros((1,) * 5, np.float32),
    ],
)
def test_unsendable_arrays(array):
    with pytest.raises(EncodeError):
        array_to_wire(array)


def test_a_float32_array_over_the_element_limit_is_refused(monkeypatch):
    from shared.protocol import arrays

    monkeypatch.setattr(arrays, "MAX_ELEMENTS", 11)  # 2**26 elements would take 256 MiB here
    assert array_to_wire(np.zeros(11, np.float32))["shape"] == [11]
    with pytest.raises(EncodeError):
        array_to_wire(np.zeros(12, np.float32))


def _wire(dtype="<f4", shape=(2, 3), data=None):
    data = bytes(24) if data is None else data
    return {"dtype": dtype, "shape": list(shape), "data": data}


@pytest.mark.parametrize(
    "wire",
    [
        _wire(dtype="|O"),
        _wire(dtype="|O8"),
        _wire(dtype=">f4"),
        _wire(dtype="<U4"),
        _wire(dtype="V8"),
        _wire(dtype="float32"),
        _wire(dtype=["<f4"]),
        _wire(shape=(2, 4)),
        _wire(shape=(2, -3)),
        _wire(shape=(2**31, 2**31)),
        _wire(shape=(1, 1, 1, 1, 1)),
        _wire(shape=(True, 3)),
        _wire(data="not bytes"),
        {"dtype": "<f4", "shape": (2, 3), "data": bytes(24)},
        {"dtype": "<f4", "data": bytes(24)},
        [1, 2, 3],
    ],
)
def test_hostile_array_headers_are_decode_errors(wire):
    with pytest.raises(DecodeError):
        array_from_wire(wire)


def test_pinned_dtype_is_enforced():
    with pytest.raises(DecodeError, match="not allowed here"):
        array_from_wire(array_to_wire(np.zeros(3, np.float64)), dtype="<f4")


# Worst-case error of each encoding: float16 relative to each value (round to nearest, 11-bit
# significand), int8 relative to the largest magnitude in the value's column.
BOUNDS = {ArrayEncoding.FLOAT32: 0.0, ArrayEncoding.FLOAT16: 2**-11, ArrayEncoding.INT8: 1 / 254}


@pytest.mark.parametrize("encoding", list(ArrayEncoding))
@pytest.mark.parametrize("seed", [0, 1])
def test_compression_round_trips_within_bounds(encoding, seed):
    arrays = adapter_arrays(np.random.default_rng(seed))
    arrays["bias"] = np.float32([0.5, -2.0, 0.0])
    packed = compress_arrays(arrays, encoding)
    assert packed["encoding"] == encoding.value
    back, used = decompress_arrays(packed)
    assert used is encoding and set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == np.float32 and back[name].shape == array.shape
        columns = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(-1, 1)
        peak = np.abs(columns).max(axis=0, keepdims=True)
        if encoding is not ArrayEncoding.INT8:
            peak = np.abs(columns)  # float16 rounds each value on its own
        error = np.abs(back[name].reshape(columns.shape) - columns)
        subnormal = 2**-25 if encoding is ArrayEncoding.FLOAT16 else 0.0  # below 2**-14
        assert np.all(error <= peak * BOUNDS[encoding] + subnormal), (encoding, name)


def test_compression_shrinks_the_payload():
    arrays = adapter_arrays(np.random.default_rng(0), dims=(561, 96, 96))  # HAR features
    sizes = {e: len(encode_sizes(arrays, e)) for e in ArrayEncoding}
    assert sizes[ArrayEncoding.INT8] < sizes[ArrayEncoding.FLOAT16] < sizes[ArrayEncoding.FLOAT32]
    assert sizes[ArrayEncoding.INT8] < 0.3 * sizes[ArrayEncoding.FLOAT32]


def encode_sizes(arrays, encoding):
    publication = AdapterPublication(
        3, BASE_HASH, "c", arrays, Lineage("r", (), "fedavg"), 1.0, encoding=encoding
    )
    data = encode(publication, sender="coordinator")
    assert decode(data).message.encoding is encoding
    return data


def test_int8_keeps_zero_rows_and_empty_arrays():
    arrays = {
        "Z": np.zeros((3, 2), np.float32),
        "E": np.zeros((0, 4), np.float32),
        "F": np.zeros((4, 0), np.float32),
        "S": np.array(2.5, dtype=np.float32),
    }
    back, _ = decompress_arrays(compress_arrays(arrays, ArrayEncoding.INT8))
    np.testing.assert_array_equal(back["Z"], arrays["Z"])
    np.testing.assert_allclose(back["S"], 2.5, rtol=1 / 254)
    assert back["E"].shape == (0, 4) and back["F"].shape == (4, 0)


@pytest.mark.parametrize(
    ("encoding", "value"),
    [
        (ArrayEncoding.INT8, np.nan),
        (ArrayEncoding.INT8, np.inf),
        (ArrayEncoding.FLOAT16, 1e6),
    ],
)
def test_values_an_encoding_cannot_carry_are_refused(encoding, value):
    with pytest.raises(EncodeError):
        compress_arrays({"A1": np.float32([[1.0, value]])}, encoding)


def test_compress_refuses_non_float_arrays():
    with pytest.raises(EncodeError):
        compress_arrays({"A1": np.arange(3)}, ArrayEncoding.FLOAT32)


@pytest.mark.parametrize(
    "packed",
    [
        {"encoding": "bf16", "arrays": {}},
        {"encoding": "float32"},
        {"encoding": "float32", "arrays": {"bad name": array_to_wire(np.zeros(2, np.float32))}},
        {"encoding": "float32", "arrays": {"A1": array_to_wire(np.zeros(2, np.float16))}},
        {"encoding": "int8", "arrays": {"A1": array_to_wire(np.zeros((2, 2), np.int8))}},
        {
            "encoding": "int8",
            "arrays": {
                "A1": {
                    **array_to_wire(np.zeros((2, 2), np.int8)),
                    "scale": array_to_wire(np.float32([1.0, -1.0])),  # negative
                }
            },
        },
        {
            "encoding": "int8",
            "arrays": {
                "A1": {
                    **array_to_wire(np.zeros((2, 2), np.int8)),
                    "scale": array_to_wire(np.float32([1.0])),
                }
            },
        },
    ],
)
def test_malformed_compressed_payloads(packed):
    with pytest.raises(DecodeError):
        decompress_arrays(packed)
