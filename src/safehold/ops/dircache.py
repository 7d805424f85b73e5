"""The directory cache: what each directory looked like at the last backup, and its tree id.

A directory whose entries (after excludes) have the same lstat fields as last time, and whose
subdirectories produce the same trees, produces the same tree again: the backup reuses the tree
id without building a node per entry, reading xattrs or parsing the parent snapshot's tree. It
is a local cache like any other: a missing or damaged file only costs speed, and every reused tree
must still be in the repository's index.

The fingerprint covers name, type and mode, owner, size, mtime, ctime, inode, link count and
device number of every entry; any change of content, metadata, xattrs or symlink target changes
the ctime, so it shows. Access times are not covered (backups do not record them).

It names every directory backed up, so it is kept sealed in the local cache
(:meth:`Cache.put_private`: AES-256-GCM under a key derived from the repository's secrets); a
file that does not open is ignored and rebuilt.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import blake3
import msgpack

from safehold.repository.cache import Cache

_ENTRY = struct.Struct("<IIIqqqQQQ")
CACHE_VERSION = 3
CACHE_NAME = "dirs.msgpack"


@dataclass(frozen=True, slots=True)
class DirState:
    fingerprint: bytes
    tree: bytes
    children: dict[bytes, bytes]  # subdirectory name -> its tree id


def damage_digest(blobs: Iterable[bytes]) -> bytes:
    """A digest of a set of blob ids (empty for none)."""
    ids = sorted(blobs)
    return blake3.blake3(b"".join(ids)).digest(16) if ids else b""


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
    gone, so the whole cache is dropped.

    ``damage``: a digest of the blobs known damaged (with no good copy) now. Every tree the
    cache was saved with refers to none of the damaged blobs of its own run; while the digest is
    the same, :attr:`verified` says so, and a reused tree needs no reading. When it differs, the
    caller checks each tree before reusing it, and only what this run saw is saved."""

    def __init__(
        self, cache: Cache | None, live_indexes: set[str] | None = None, damage: bytes = b""
    ) -> None:
        self.cache = cache if cache is not None and cache.key is not None else None
        self.old: dict[bytes, DirState] = {}
        self.new: dict[bytes, DirState] = {}
        self.indexes = set(live_indexes or ())
        self.damage = damage
        self.verified = True
        if self.cache is not None:
            self.old, saved_with, saved_damage = _load(self.cache.get_private(CACHE_NAME))
            if not saved_with <= self.indexes:
                self.old = {}
            self.verified = saved_damage == damage

    def get(self, dirpath: bytes) -> DirState | None:
        return self.old.get(dirpath)

    def put(self, dirpath: bytes, state: DirState) -> None:
        self.new[dirpath] = state

    def save(self, roots: list[bytes]) -> None:
        """Keep what this run saw, and what earlier runs saw outside the paths backed up now."""
        if self.cache is None:
            return
        prefixes = tuple(r.rstrip(b"/") + b"/" for r in roots)
        kept = self.old if self.verified else {}  # not checked against today's damage
        merged = {k: v for k, v in kept.items() if not (k + b"/").startswith(prefixes)} | self.new
        data = msgpack.packb(
            {
                "v": CACHE_VERSION,
                "indexes": sorted(self.indexes),
                "damage": self.damage,
                "dirs": {k: [v.fingerprint, v.tree, v.children] for k, v in merged.items()},
            },
            use_bin_type=True,
        )
        self.cache.put_private(CACHE_NAME, data)


def _load(raw: bytes | None) -> tuple[dict[bytes, DirState], set[str], bytes | None]:
    """The cached states, the index ids and the damage digest they were saved with (empty when
    unusable)."""
    if raw is None:
        return {}, set(), None
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if obj.get("v") != CACHE_VERSION:
            return {}, set(), None
        out = {}
        for k, (fp, tree, children) in obj["dirs"].items():
            if isinstance(k, bytes) and isinstance(fp, bytes) and isinstance(tree, bytes):
                out[k] = DirState(fp, tree, dict(children))
        damage = obj.get("damage")
        return (
            out,
            {str(i) for i in obj["indexes"]},
            damage if isinstance(damage, bytes) else None,
        )
    except Exception:  # a damaged cache only costs speed
        return {}, set(), None
