"""msgpack helpers shared by the format modules."""

from __future__ import annotations

from typing import Any

import msgpack

from safehold.errors import FormatError

FORMAT_VERSION = 1


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


CONTAINER_BYTES = 16
"""A msgpack object may hold at most one array or map per this many bytes of its encoding (plus
1024): honest objects hold one per 40 bytes or more, and an empty container costs one byte to
encode but about 60 to hold in memory, so a flood of them is refused before it costs much."""


class _TooManyContainers(ValueError):
    pass


def unpack(data: bytes | memoryview, what: str, *, max_field: int | None = None) -> Any:
    """Decode msgpack; ``max_field`` bounds every str and bin (trees: no field is longer)."""
    limit = len(data) // CONTAINER_BYTES + 1024
    field_max = len(data) if max_field is None else min(len(data), max_field)
    count = 0

    def counted(obj: Any) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyContainers(f"more than {limit} arrays and maps")
        return obj

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            list_hook=counted,
            object_hook=counted,
            max_array_len=len(data),
            max_map_len=len(data),
            max_str_len=field_max,
            max_bin_len=field_max,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise FormatError(f"{what} is not valid: {e}") from None


def need_map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a map")
    return obj


def field(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    try:
        value = obj[key]
    except KeyError:
        raise FormatError(f"{what} lacks field {key!r}") from None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise FormatError(f"{what} field {key!r} has the wrong type")
    return value


def opt(
    obj: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str, default: Any
) -> Any:
    if key not in obj or obj[key] is None:
        return default
    return field(obj, key, typ, what)


def check_id(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise FormatError(f"{what} is not a 32-byte id")
    return value


def check_version(obj: dict[str, Any], what: str) -> None:
    v = field(obj, "v", int, what)
    if v != FORMAT_VERSION:
        raise FormatError(f"{what} has unknown version {v}")
