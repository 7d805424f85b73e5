"""Prune plan objects (``plans/<id>``): what a prune condemned, waiting for deletion."""

from __future__ import annotations

from dataclasses import dataclass, field

from safehold.format.common import (
    FORMAT_VERSION,
    check_id,
    check_version,
    need_map,
    pack,
    unpack,
)
from safehold.format.common import (
    field as get_field,
)


@dataclass(slots=True)
class PlanFile:
    time_ns: int
    condemned: list[bytes] = field(default_factory=list)  # pack ids
    superseded: list[bytes] = field(default_factory=list)  # index ids replaced by prune
    indexes: list[bytes] = field(default_factory=list)  # every index id known when planned
    snapshots: list[bytes] = field(default_factory=list)  # every snapshot id known when planned
    locks: list[str] = field(default_factory=list)  # other clients' locks when planned

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": FORMAT_VERSION,
                "time": self.time_ns,
                "condemned": self.condemned,
                "superseded": self.superseded,
                "indexes": self.indexes,
                "snapshots": self.snapshots,
                "locks": self.locks,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PlanFile:
        what = "prune plan"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)

        def ids(key: str) -> list[bytes]:
            return [check_id(x, f"{what} {key}") for x in get_field(obj, key, list, what)]

        locks = get_field(obj, "locks", list, what)
        if not all(isinstance(x, str) for x in locks):
            from safehold.errors import FormatError

            raise FormatError("prune plan lists a malformed lock id")
        return cls(
            time_ns=get_field(obj, "time", int, what),
            condemned=ids("condemned"),
            superseded=ids("superseded"),
            indexes=ids("indexes"),
            snapshots=ids("snapshots"),
            locks=locks,
        )
