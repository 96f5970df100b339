"""msgpack in and out, and a typed reader for decoded maps. Everything here that reads untrusted
bytes raises DecodeError and nothing else."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, TypeVar, overload

import msgpack

from shared.protocol.errors import DecodeError, EncodeError

# A msgpack map as it goes on or comes off the wire: string keys, values of any wire type.
WireMap = dict[str, Any]
E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")
_MISSING = object()


def _reject_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def _strict_map(pairs: list[tuple[object, object]]) -> dict[object, object]:
    # A repeated key would let two readers disagree about a message; refuse it.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DecodeError("map with a repeated key")
    for key in result:  # msgpack makes str or bytes keys (strict_map_key), never a subclass
        if key.__class__ is not str:
            raise DecodeError("map keys must be strings")
    return result


def pack(obj: object) -> bytes:
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot pack message: {exc}") from exc


def unpack(data: object, *, max_bytes: int) -> object:
    """Size check first, then msgpack with ext types refused and lengths bounded by the input.

    msgpack's `unpackb` bounds every str/bin/array/map length by len(data) by itself
    (`max_buffer_size` is an Unpacker-only option), so a 2**31-element header fails cleanly.
    """
    if not isinstance(data, bytes | bytearray):
        raise DecodeError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            object_pairs_hook=_strict_map,
            timestamp=0,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise DecodeError(f"payload is not valid msgpack: {exc!r}") from None


# What each reader accepts, by exact type: a value of one of these is accepted at once.
_EXACT: dict[object, frozenset[type]] = {
    str: frozenset({str}),
    int: frozenset({int}),
    (int, float): frozenset({int, float}),
    bool: frozenset({bool}),
    bytes: frozenset({bytes}),
    dict: frozenset({dict}),
    list: frozenset({list}),
}


class Fields:
    """Typed access to a decoded map; wrong or missing fields raise DecodeError naming them.

    Each reader returns its type, or `T | None` when called with `optional=True` (the
    overloads say so to the type checker; the value is the same either way).
    """

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, dict):
            raise DecodeError(f"{what} must be a map, got {type(obj).__name__}")
        self._obj: WireMap = obj
        self._what = what

    def _get(self, key: str, types: type[T] | tuple[type[T], ...], optional: bool) -> T | None:
        value = self._obj.get(key, _MISSING)
        # The common case first: msgpack makes exactly these types (no subclasses; bool is
        # its own type, so it never passes for a number here).
        if value.__class__ in _EXACT.get(types, ()):
            return value  # type: ignore[no-any-return]
        if value is _MISSING or value is None:
            if optional:
                return None
            raise DecodeError(f"{self._what}: missing field {key!r}")
        # bool is an int subclass: never accept it where a number is expected, or vice versa.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise DecodeError(f"{self._what}: field {key!r} has type {type(value).__name__}")
        return value

    def _required(self, key: str, types: type[T] | tuple[type[T], ...]) -> T:
        value = self._get(key, types, False)
        assert value is not None  # _get raised for a missing field
        return value

    @overload
    def text(self, key: str, *, optional: Literal[False] = False) -> str: ...
    @overload
    def text(self, key: str, *, optional: bool) -> str | None: ...
    def text(self, key: str, *, optional: bool = False) -> str | None:
        return self._get(key, str, optional)

    @overload
    def integer(self, key: str, *, optional: Literal[False] = False) -> int: ...
    @overload
    def integer(self, key: str, *, optional: bool) -> int | None: ...
    def integer(self, key: str, *, optional: bool = False) -> int | None:
        return self._get(key, int, optional)

    @overload
    def number(self, key: str, *, optional: Literal[False] = False) -> float: ...
    @overload
    def number(self, key: str, *, optional: bool) -> float | None: ...
    def number(self, key: str, *, optional: bool = False) -> float | None:
        value = self._get(key, (int, float), optional)
        return None if value is None else float(value)

    @overload
    def boolean(self, key: str, *, optional: Literal[False] = False) -> bool: ...
    @overload
    def boolean(self, key: str, *, optional: bool) -> bool | None: ...
    def boolean(self, key: str, *, optional: bool = False) -> bool | None:
        return self._get(key, bool, optional)

    def blob(self, key: str) -> bytes:
        return self._required(key, bytes)

    @overload
    def mapping(self, key: str, *, optional: Literal[False] = False) -> dict[str, Any]: ...
    @overload
    def mapping(self, key: str, *, optional: bool) -> dict[str, Any] | None: ...
    def mapping(self, key: str, *, optional: bool = False) -> dict[str, Any] | None:
        return self._get(key, dict, optional)

    def sequence(self, key: str) -> list[Any]:
        return self._required(key, list)

    @overload
    def choice(self, key: str, enum_type: type[E], *, optional: Literal[False] = False) -> E: ...
    @overload
    def choice(self, key: str, enum_type: type[E], *, optional: bool) -> E | None: ...
    def choice(self, key: str, enum_type: type[E], *, optional: bool = False) -> E | None:
        value = self._get(key, str, optional)
        if value is None:
            return None
        try:
            return enum_type(value)
        except ValueError:
            raise DecodeError(f"{self._what}: unknown {key} {value!r}") from None


def _tuple(types: type[T] | tuple[type[T], ...]) -> tuple[type[T], ...]:
    return types if isinstance(types, tuple) else (types,)
