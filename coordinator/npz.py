"""A .npz file's bytes, written directly: numpy's own format, which np.load reads.

The actor stores every fine-tune report's arrays (six small ones) before it acknowledges the
report; np.savez goes through zipfile and the .npy writer, about 0.5 ms of CPU a report, most of
the report's handling. This writes the same archive (stored, uncompressed members `NAME.npy`,
.npy format 1.0) in one pass over precomputed headers.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

import numpy as np

_LOCAL = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # structCentralDir
_END = struct.Struct("<4s4H2LH")  # structEndArchive
_ZIP_VERSION = 20  # 2.0: what a stored member needs
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the earliest a zip can say
_NPY_ALIGN = 64  # .npy headers pad the data to this (as numpy writes them)
_MAX_MEMBER = 2**32 - 1  # no ZIP64: report arrays are kilobytes


def npy_bytes(array: np.ndarray) -> bytes:
    """One array in .npy format 1.0 (C order, little-endian as stored by the dtype)."""
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        array = array.copy(order="C")
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be stored without pickle")
    descr = np.lib.format.dtype_to_descr(array.dtype)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {array.shape!r}, }}"
    fixed = len(b"\x93NUMPY") + 2 + 2  # magic, version, header length
    padding = -(fixed + len(header) + 1) % _NPY_ALIGN
    text = (header + " " * padding + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + array.tobytes()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A stored (uncompressed) zip of NAME.npy members, as np.savez writes it."""
    parts: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for key, array in arrays.items():
        name = f"{key}.npy".encode()
        data = npy_bytes(np.asarray(array))
        if len(data) > _MAX_MEMBER:
            raise ValueError(f"array {key!r} is too large for a zip without ZIP64")
        crc = zlib.crc32(data)
        size = len(data)
        local = _LOCAL.pack(
            b"PK\x03\x04", _ZIP_VERSION, 0, 0, 0, 0, _DOS_DATE, crc, size, size, len(name), 0
        )
        entry = (_ZIP_VERSION, 0, _ZIP_VERSION, 0, 0, 0, 0, _DOS_DATE, crc, size, size)
        central.append(_CENTRAL.pack(b"PK\x01\x02", *entry, len(name), 0, 0, 0, 0, 0, offset))
        central.append(name)
        parts += (local, name, data)
        offset += len(local) + len(name) + size
    directory = b"".join(central)
    count = len(central) // 2  # a record and a name per member
    end = _END.pack(b"PK\x05\x06", 0, 0, count, count, len(directory), offset, 0)
    return b"".join(parts) + directory + end
