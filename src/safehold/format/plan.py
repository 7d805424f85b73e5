"""Prune plan objects (``plans/<id>``): what a prune condemned, waiting for deletion."""

from __future__ import annotations

from dataclasses import dataclass, field

from safehold.errors import FormatError
from safehold.format.common import (
    FORMAT_VERSION,
    check_id,
    check_version,
    need_map,
    opt,
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
    indexes: list[bytes] = field(default_factory=list)  # every index id once prune's were in
    snapshots: list[bytes] = field(default_factory=list)  # every snapshot id known when planned
    locks: list[str] = field(default_factory=list)  # other clients' locks once the index was in
    grace_s: float = 0.0  # how long the planning prune wanted to wait (informational)

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
                "grace": self.grace_s,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PlanFile:
        what = "prune plan"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)

        def ids(key: str) -> list[bytes]:
            return [check_id(x, f"{what} {key}") for x in opt(obj, key, list, what, [])]

        locks = opt(obj, "locks", list, what, [])
        if not all(isinstance(x, str) for x in locks):
            raise FormatError("prune plan lists a malformed lock id")
        grace = obj.get("grace", 0.0)
        if not isinstance(grace, int | float) or isinstance(grace, bool):
            raise FormatError("prune plan has a malformed grace")
        return cls(
            time_ns=get_field(obj, "time", int, what),
            condemned=ids("condemned"),
            superseded=ids("superseded"),
            indexes=ids("indexes"),
            snapshots=ids("snapshots"),
            locks=locks,
            grace_s=float(grace),
        )
