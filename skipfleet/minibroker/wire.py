"""MQTT data representations (§1.5) and MQTT 5 properties (§2.2.2): read from a packet body,
written into bytes. Every decoding failure raises PacketError, never IndexError or struct.error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from skipfleet.minibroker.codes import PropertyId, malformed, protocol_error

MAX_VARINT = 268_435_455  # four 7-bit groups: the largest Variable Byte Integer
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Reader:
    """A cursor over one packet body (the bytes after the fixed header)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def _take(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise malformed(f"needs {count} more bytes, has {len(self._data) - self._pos}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def byte(self) -> int:
        if self._pos >= len(self._data):
            raise malformed("needs 1 more byte, has 0")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def uint16(self) -> int:
        return _U16.unpack(self._take(2))[0]

    def uint32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            digit = self.byte()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
            shift += 7
        raise malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self._take(self.uint16())

    def utf8(self) -> str:
        return decode_utf8(self.binary())

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def sub_reader(self, length: int) -> Reader:
        return Reader(self._take(length))


def decode_utf8(raw: bytes) -> str:
    """Strict UTF-8 without U+0000 (§1.5.4: both make the packet malformed)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("string is not valid UTF-8") from None
    if "\x00" in text:
        raise malformed("string contains U+0000")
    return text


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        digit, value = value & 0x7F, value >> 7
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _U16.pack(len(data)) + data


def encode_utf8(text: str) -> bytes:
    return encode_binary(text.encode("utf-8"))


def encode_uint16(value: int) -> bytes:
    return _U16.pack(value)


def encode_uint32(value: int) -> bytes:
    return _U32.pack(value)


# ---- MQTT 5 properties -------------------------------------------------------------------------
# property block:  [length: varint] ([id: varint(1 byte in practice)] [value: by the id's type])*

_BYTE = frozenset(
    {
        PropertyId.PAYLOAD_FORMAT_INDICATOR,
        PropertyId.REQUEST_PROBLEM_INFORMATION,
        PropertyId.REQUEST_RESPONSE_INFORMATION,
        PropertyId.MAXIMUM_QOS,
        PropertyId.RETAIN_AVAILABLE,
        PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE,
        PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        PropertyId.SHARED_SUBSCRIPTION_AVAILABLE,
    }
)
_UINT16 = frozenset(
    {
        PropertyId.SERVER_KEEP_ALIVE,
        PropertyId.RECEIVE_MAXIMUM,
        PropertyId.TOPIC_ALIAS_MAXIMUM,
        PropertyId.TOPIC_ALIAS,
    }
)
_UINT32 = frozenset(
    {
        PropertyId.MESSAGE_EXPIRY_INTERVAL,
        PropertyId.SESSION_EXPIRY_INTERVAL,
        PropertyId.WILL_DELAY_INTERVAL,
        PropertyId.MAXIMUM_PACKET_SIZE,
    }
)
_BINARY = frozenset({PropertyId.CORRELATION_DATA, PropertyId.AUTHENTICATION_DATA})
# Everything else is a UTF-8 string, except these two:
_VARINT = PropertyId.SUBSCRIPTION_IDENTIFIER
_PAIR = PropertyId.USER_PROPERTY

Properties = dict[PropertyId, Any]
"""Decoded properties: user properties as a tuple of (name, value) pairs, the rest one value."""


def read_properties(reader: Reader, allowed: frozenset[PropertyId]) -> Properties:
    block = reader.sub_reader(reader.varint())
    found: Properties = {}
    pairs: list[tuple[str, str]] = []
    while not block.at_end:
        code = block.varint()
        try:
            prop = PropertyId(code)
        except ValueError:
            raise malformed(f"unknown property 0x{code:02x}") from None
        if prop not in allowed:
            raise malformed(f"property {prop.name} is not valid in this packet")
        if prop is _PAIR:
            pairs.append((block.utf8(), block.utf8()))
            continue
        if prop in found:
            raise protocol_error(f"property {prop.name} given twice")
        found[prop] = _read_value(block, prop)
    if pairs:
        found[_PAIR] = tuple(pairs)
    return found


def _read_value(block: Reader, prop: PropertyId) -> Any:
    if prop in _BYTE:
        return block.byte()
    if prop in _UINT16:
        return block.uint16()
    if prop in _UINT32:
        return block.uint32()
    if prop in _BINARY:
        return block.binary()
    if prop is _VARINT:
        return block.varint()
    return block.utf8()


def encode_property(prop: PropertyId, value: Any) -> bytes:
    """One property (id + value); a user property's value is one (name, value) pair."""
    if prop in _BYTE:
        body = bytes((value,))
    elif prop in _UINT16:
        body = _U16.pack(value)
    elif prop in _UINT32:
        body = _U32.pack(value)
    elif prop in _BINARY:
        body = encode_binary(value)
    elif prop is _VARINT:
        body = encode_varint(value)
    elif prop is _PAIR:
        body = encode_utf8(value[0]) + encode_utf8(value[1])
    else:
        body = encode_utf8(value)
    return bytes((prop,)) + body


def encode_properties(items: Iterable[tuple[PropertyId, Any]]) -> bytes:
    """A whole property block, length prefix included."""
    body = b"".join(encode_property(prop, value) for prop, value in items)
    return encode_varint(len(body)) + body
