"""Helpers of the damage matrix (tests/test_damage_matrix.py): what a pristine repository holds
(packs, index objects, keys, and which blobs and trees every file of every snapshot depends on),
ways to damage one object on disk, and the comparison of a restore with the source it came from.

Everything here reads the pristine repository with the library; the damage itself is done to a
copy, byte by byte, and judged through the CLI by the test.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from safehold.format.pack import PACK_PREFIX_LEN, PackEntry
from safehold.ids import BlobType, storage_id
from safehold.repository.repo import Repository
from tests.support.treecmp import tree_digest

FileState = tuple[str, int, int, bytes | None]
"""What a restored file must equal: kind, permission bits, size, content hash or link target."""


def file_states(root: Path) -> dict[bytes, FileState]:
    """The regular files and symlinks below ``root``, by relative bytes path."""
    return {
        name: (e.kind, e.mode, e.size, e.content)
        for name, e in tree_digest(root).items()
        if e.kind in ("file", "symlink")
    }


@dataclass
class PackInfo:
    pack_id: str
    type: int  # BlobType of its blobs
    size: int
    blobs: list[PackEntry]

    def header_span(self, data: bytes) -> tuple[int, int]:
        """(offset, length) of the encrypted header, from the pack's own trailer."""
        (length,) = struct.unpack("<I", data[-8:-4])
        return len(data) - 8 - length, length


@dataclass
class SnapInfo:
    snap_id: str
    expected: dict[bytes, FileState]  # the source's files when it was backed up
    deps: dict[bytes, frozenset[bytes]]  # file -> its content blobs and every ancestor tree
    trees: dict[bytes, set[bytes]] = field(default_factory=dict)  # tree -> files below it
    root: bytes = b""
    time_ns: int = 0


@dataclass
class Layout:
    """The pristine repository, as the library reads it before any damage."""

    packs: dict[str, PackInfo]
    indexes: dict[str, set[str]]  # index id -> the packs it lists
    snaps: list[SnapInfo]  # oldest first
    blob_pack: dict[bytes, str]  # blob id -> the pack the index serves it from

    def packs_of(self, kind: int) -> list[PackInfo]:
        return [p for p in self.packs.values() if p.type == kind]

    def pack_of(self, blob: bytes) -> PackInfo:
        return self.packs[self.blob_pack[blob]]

    def only_in(self, index_id: str) -> set[bytes]:
        """The blobs of the packs that no other index object lists."""
        others = set().union(*(v for k, v in self.indexes.items() if k != index_id))
        return {b.id for pid in self.indexes[index_id] - others for b in self.packs[pid].blobs}


def read_layout(repo: Repository, source: Path, expected: list[dict[bytes, FileState]]) -> Layout:
    """Read a pristine repository whose snapshots (oldest first) each back up ``source`` once;
    ``expected`` holds the source's files at each backup."""
    index = repo.reload_index(use_cache=False)
    packs: dict[str, PackInfo] = {}
    blob_pack: dict[bytes, str] = {}
    for p in index.packs():
        kinds = {b.type for b in p.blobs}
        assert len(kinds) == 1, "a pack mixes blob types"
        pid = p.pack_id.hex()
        packs[pid] = PackInfo(pid, kinds.pop(), p.size, sorted(p.blobs, key=lambda b: b.offset))
    for b in {b.id for p in packs.values() for b in p.blobs}:
        loc = index.lookup(b)
        assert loc is not None
        blob_pack[b] = loc.pack_id.hex()
    indexes = {
        iid: {p.pack_id.hex() for p in repo.read_index_file(iid, use_cache=False).packs}
        for iid in repo.list_ids("index/")
    }
    snaps = repo.snapshots()
    assert len(snaps) == len(expected)
    prefix = tuple(os.fsencode(source).strip(b"/").split(b"/"))
    infos = []
    for snap, exp in zip(snaps, expected, strict=True):
        info = SnapInfo(snap.id, exp, {}, root=snap.tree, time_ns=snap.time_ns)
        # (tree id, path components of the directory, ancestor trees including it)
        stack: list[tuple[bytes, tuple[bytes, ...], frozenset[bytes]]] = [
            (snap.tree, (), frozenset({snap.tree}))
        ]
        while stack:
            tid, parts, above = stack.pop()
            for n in repo.read_tree(tid):
                path = (*parts, n.name)
                if n.type == "dir" and n.subtree is not None:
                    stack.append((n.subtree, path, above | {n.subtree}))
                elif len(path) > len(prefix) and path[: len(prefix)] == prefix:
                    rel = b"/".join(path[len(prefix) :])
                    info.deps[rel] = above | set(n.content or [])
                    for t in above:
                        info.trees.setdefault(t, set()).add(rel)
        missing = set(exp) - set(info.deps)
        assert not missing, f"files of the source not in snapshot {snap.id[:8]}: {missing}"
        infos.append(info)
    return Layout(packs, indexes, infos, blob_pack)


def touched(snap: SnapInfo, damaged_blobs: set[bytes]) -> set[bytes]:
    """The files of ``snap`` whose content blobs or ancestor trees are among ``damaged_blobs``."""
    return {f for f, deps in snap.deps.items() if deps & damaged_blobs}


def blobs_overlapping(pack: PackInfo, start: int, end: int) -> set[bytes]:
    """The blobs of ``pack`` with a stored byte in [start, end)."""
    return {b.id for b in pack.blobs if b.offset < end and start < b.offset + b.length}


# --- doing damage --------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def stray_id(data: bytes) -> str:
    """A valid-looking id that is not the storage id of ``data`` (and is deterministic)."""
    sid = storage_id(data)
    stray = blake3.blake3(b"stray copy of " + sid.encode()).hexdigest()
    assert stray != sid
    return stray


def pack_offsets(pack: PackInfo, data: bytes, blob: PackEntry) -> dict[str, int]:
    """Where to flip a byte in each part of a pack (``blob``: the blob to damage)."""
    hoff, hlen = pack.header_span(data)
    return {
        "header": hoff + hlen // 2,
        "trailer": len(data) - 8,  # the low byte of the header length
        "sealed-key": 4 + (PACK_PREFIX_LEN - 4) // 2,
        "blob": blob.offset + blob.length // 2,
    }


def tree_with_fewest_files(snap: SnapInfo, candidates: Iterable[bytes]) -> bytes:
    """Of the tree blobs in ``candidates`` that hold files of ``snap``, the one with the fewest
    files below it (so that damaging it leaves the others restorable)."""
    held = [(len(snap.trees[t]), t) for t in candidates if snap.trees.get(t)]
    assert held, "no candidate tree holds files"
    return min(held)[1]


def is_tree_pack(pack: PackInfo) -> bool:
    return pack.type == BlobType.TREE
