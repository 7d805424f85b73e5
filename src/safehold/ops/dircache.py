"""The directory cache: what each directory looked like at the last backup, and its tree id.

A directory whose entries (after excludes) have the same lstat fields as last time, and whose
subdirectories produce the same trees, produces the same tree again: the backup reuses the tree
id without building a node per entry, reading xattrs or parsing the parent snapshot's tree. It
is a local cache like any other: a missing or damaged file only costs speed, and every reused tree
must still be in the repository's index.

The fingerprint covers name, type and mode, owner, size, mtime, ctime, inode, link count and
device number of every entry; any change of content, metadata, xattrs or symlink target changes
the ctime, so it shows. Access times are not covered (backups do not record them).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3
import msgpack

_ENTRY = struct.Struct("<IIIqqqQQQ")
CACHE_VERSION = 2


@dataclass(frozen=True, slots=True)
class DirState:
    fingerprint: bytes
    tree: bytes
    children: dict[bytes, bytes]  # subdirectory name -> its tree id


def fingerprint(entries: Iterable[tuple[bytes, os.stat_result]]) -> bytes:
    h = blake3.blake3()
    for name, st in entries:
        h.update(struct.pack("<I", len(name)))
        h.update(name)
        h.update(
            _ENTRY.pack(
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_nlink,
                st.st_rdev,
            )
        )
    return h.digest(16)


class DirCache:
    """``live_indexes``: the ids of the repository's live index objects now. The cache is
    valid only while every index object it was saved with is still live: a prune supersedes
    them all, and after a prune a cached tree may still be indexed while data it refers to is
    gone, so the whole cache is dropped."""

    def __init__(self, path: Path | None, live_indexes: set[str] | None = None) -> None:
        self.path = path
        self.old: dict[bytes, DirState] = {}
        self.new: dict[bytes, DirState] = {}
        self.indexes = set(live_indexes or ())
        if path is not None:
            self.old, saved_with = _load(path)
            if not saved_with <= self.indexes:
                self.old = {}

    def get(self, dirpath: bytes) -> DirState | None:
        return self.old.get(dirpath)

    def put(self, dirpath: bytes, state: DirState) -> None:
        self.new[dirpath] = state

    def save(self, roots: list[bytes]) -> None:
        """Keep what this run saw, and what earlier runs saw outside the paths backed up now."""
        if self.path is None:
            return
        prefixes = tuple(r.rstrip(b"/") + b"/" for r in roots)
        merged = {
            k: v for k, v in self.old.items() if not (k + b"/").startswith(prefixes)
        } | self.new
        data = msgpack.packb(
            {
                "v": CACHE_VERSION,
                "indexes": sorted(self.indexes),
                "dirs": {k: [v.fingerprint, v.tree, v.children] for k, v in merged.items()},
            },
            use_bin_type=True,
        )
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.path)


def _load(path: Path) -> tuple[dict[bytes, DirState], set[str]]:
    """The cached states and the index ids they were saved with (empty when unusable)."""
    try:
        obj = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
        if obj.get("v") != CACHE_VERSION:
            return {}, set()
        out = {}
        for k, (fp, tree, children) in obj["dirs"].items():
            if isinstance(k, bytes) and isinstance(fp, bytes) and isinstance(tree, bytes):
                out[k] = DirState(fp, tree, dict(children))
        return out, {str(i) for i in obj["indexes"]}
    except Exception:  # a damaged cache only costs speed
        return {}, set()
