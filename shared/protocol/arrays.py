"""NumPy arrays on the wire: `{"dtype": "<f4", "shape": [...], "data": bytes}`, and the lossy
adapter encodings (float16, int8 with per-column scales) that always decode back to float32.

Decoding never hands an untrusted string to np.dtype before it passed the allow-list, never
allows object dtypes, and checks the byte count against the shape before touching the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from shared.protocol import checks
from shared.protocol.enums import ArrayEncoding
from shared.protocol.errors import DecodeError, EncodeError
from shared.protocol.wire import WireMap

ALLOWED_DTYPES = frozenset({"<f4", "<f2", "<f8", "|i1", "|u1", "<i4", "<i8"})
MAX_NDIM = 4
MAX_ELEMENTS = 1 << 26  # 256 MiB of float32: far above any adapter, bounds hostile shapes
_WIRE_DTYPE = {
    ArrayEncoding.FLOAT32: "<f4",
    ArrayEncoding.FLOAT16: "<f2",
    ArrayEncoding.INT8: "|i1",
}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# numpy's little-endian float32 dtype is one object; a big-endian machine's native float32 is
# another, and its arrays take the general path (converted to little-endian there)
_FLOAT32 = np.dtype("<f4")


def array_to_wire(array: np.ndarray) -> WireMap:
    """Pack one array; its dtype must be in ALLOWED_DTYPES (after conversion to little-endian)."""
    if (
        array.__class__ is np.ndarray
        and array.dtype is _FLOAT32
        and array.flags.c_contiguous
        and array.ndim <= MAX_NDIM
        and array.size <= MAX_ELEMENTS
    ):  # an adapter's arrays: the same map as below, without its conversions (10 -> 5 µs a
        # report's six; the fleet actor stores every report's arrays so)
        return {"dtype": "<f4", "shape": list(array.shape), "data": array.tobytes()}
    array = np.asarray(array)
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if little.str not in ALLOWED_DTYPES or array.ndim > MAX_NDIM or array.size > MAX_ELEMENTS:
        raise EncodeError(f"cannot send array of dtype {array.dtype.str} and shape {array.shape}")
    data = np.ascontiguousarray(array, dtype=little).tobytes()
    return {"dtype": little.str, "shape": list(array.shape), "data": data}


def _wire_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise DecodeError(f"array shape must be a list of at most {MAX_NDIM} dimensions")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_ELEMENTS:
            raise DecodeError(f"array dimension {dim!r} is not an integer in [0, {MAX_ELEMENTS}]")
    if math.prod(shape) > MAX_ELEMENTS:
        raise DecodeError(f"array of shape {shape} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def array_from_wire(obj: object, *, dtype: str | None = None) -> np.ndarray:
    """Unpack one array (read-only, backed by the message bytes); `dtype` pins the expected one."""
    if not isinstance(obj, dict):
        raise DecodeError("array must be a map with dtype, shape and data")
    wire_dtype, data = obj.get("dtype"), obj.get("data")
    allowed = isinstance(wire_dtype, str) and wire_dtype in ALLOWED_DTYPES
    if not allowed or (dtype is not None and wire_dtype != dtype):
        raise DecodeError(f"array dtype {wire_dtype!r} is not allowed here")
    if not isinstance(data, bytes):
        raise DecodeError("array data must be bytes")
    shape = _wire_shape(obj.get("shape"))
    numpy_dtype = np.dtype(wire_dtype)
    if math.prod(shape) * numpy_dtype.itemsize != len(data):
        raise DecodeError(f"array data has {len(data)} bytes, shape {shape} needs another count")
    return np.frombuffer(data, dtype=numpy_dtype).reshape(shape)


def _columns(shape: tuple[int, ...]) -> tuple[int, int]:
    """int8 scales are per output column (last axis) of a matrix, per tensor for vectors.

    Adapter factors are (in x out) with a small `out` (rank or class count), so per-column
    scales cost a few floats where per-row scales would cost one float per handful of bytes.
    """
    if len(shape) < 2:
        return math.prod(shape), 1
    return math.prod(shape[:-1]), shape[-1]


def _quantize_int8(array: np.ndarray) -> WireMap:
    if not np.all(np.isfinite(array)):
        raise EncodeError("int8 encoding needs finite values")
    rows, cols = _columns(array.shape)
    matrix = array.astype(np.float64).reshape(rows, cols)
    peak = np.abs(matrix).max(axis=0) if rows else np.zeros(cols)
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[None, :]
    quantized = np.clip(np.rint(matrix / safe), -127, 127).astype(np.int8)
    wire = array_to_wire(quantized.reshape(array.shape))
    wire["scale"] = array_to_wire(scale)
    return wire


def _dequantize_int8(obj: WireMap) -> np.ndarray:
    quantized = array_from_wire(obj, dtype="|i1")
    scale = array_from_wire(obj.get("scale"), dtype="<f4")
    rows, cols = _columns(quantized.shape)
    if scale.shape != (cols,) or not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise DecodeError(f"int8 scale must be {cols} finite non-negative float32 values")
    matrix: np.ndarray = quantized.reshape(rows, cols).astype(np.float32) * scale[None, :]
    return matrix.reshape(quantized.shape)


def _encode_one(array: np.ndarray, encoding: ArrayEncoding) -> WireMap:
    if encoding is ArrayEncoding.INT8:
        return _quantize_int8(array)
    if encoding is ArrayEncoding.FLOAT16 and np.any(np.abs(array) > _FLOAT16_MAX):
        raise EncodeError(f"values beyond ±{_FLOAT16_MAX} do not fit float16")
    return array_to_wire(array.astype(_WIRE_DTYPE[encoding]))


def compress_arrays(arrays: Mapping[str, np.ndarray], encoding: ArrayEncoding) -> WireMap:
    """Named float arrays -> `{"encoding": ..., "arrays": {name: wire array}}`."""
    encoding = ArrayEncoding(encoding)
    try:
        checks.float_arrays(arrays, "arrays")
    except ValueError as exc:
        raise EncodeError(str(exc)) from exc
    packed = {name: _encode_one(np.asarray(a), encoding) for name, a in arrays.items()}
    return {"encoding": encoding.value, "arrays": packed}


def decompress_arrays(obj: object) -> tuple[dict[str, np.ndarray], ArrayEncoding]:
    """The inverse of compress_arrays: float32 arrays (writable copies) and the encoding used."""
    if not isinstance(obj, dict) or not isinstance(obj.get("arrays"), dict):
        raise DecodeError("compressed arrays must be a map with encoding and arrays")
    try:
        # any non-string (None included) fails as an unknown value, as it would unconverted
        encoding = ArrayEncoding(str(obj.get("encoding")))
    except ValueError:
        raise DecodeError(f"unknown array encoding {obj.get('encoding')!r}") from None
    packed = obj["arrays"]
    if len(packed) > checks.MAX_ARRAYS:
        raise DecodeError(f"more than {checks.MAX_ARRAYS} arrays")
    arrays = {}
    for name, wire in packed.items():
        if not isinstance(name, str) or not checks.ARRAY_NAME.fullmatch(name):
            raise DecodeError(f"invalid array name {name!r}")
        if encoding is ArrayEncoding.INT8:
            arrays[name] = _dequantize_int8(wire)
        else:
            arrays[name] = array_from_wire(wire, dtype=_WIRE_DTYPE[encoding]).astype(np.float32)
    return arrays, encoding
