"""Repair: rebuild the index from the packs; rewrite snapshots whose data is lost.

Both run under an exclusive lock and write new objects before they delete old ones, so a repair
killed half-way leaves a repository that is no worse than before.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from safehold.compress import Compression
from safehold.errors import NotFound, SafeholdError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType, index_name, name_to_id, snapshot_name
from safehold.repository.repo import Repository


@dataclass
class RepairIndexResult:
    packs: int = 0
    blobs: int = 0
    damaged_packs: list[str] = field(default_factory=list)
    new_index: str | None = None
    removed_indexes: int = 0


def repair_index(
    repo: Repository, *, dry_run: bool = False, events: EventSink = ignore_events
) -> RepairIndexResult:
    """Read every pack's own header and write one index object listing them all; then remove
    the index objects it replaces. Packs whose header cannot be read are named and left out."""
    res = RepairIndexResult()
    packs: list[IndexedPack] = []
    for info in sorted(repo.backend.list("data/"), key=lambda i: i.name):
        pid = name_to_id(info.name)
        try:
            packs.append(repo.read_pack_index(pid))
        except SafeholdError as e:
            res.damaged_packs.append(pid)
            events(Event("warning", f"pack {pid[:16]} is unreadable and left out: {e}"))
    res.packs = len(packs)
    res.blobs = sum(len(p.blobs) for p in packs)
    old = repo.list_ids("index/")
    if dry_run:
        return res
    res.new_index = repo.store_index(IndexFile(packs, [bytes.fromhex(i) for i in old]))
    for iid in old:
        try:
            repo.backend.delete(index_name(iid))
            res.removed_indexes += 1
        except NotFound:
            pass
    repo.reload_index()
    return res


@dataclass
class RepairSnapshotsResult:
    rewritten: dict[str, str] = field(default_factory=dict)  # old snapshot id -> new id
    dropped: list[str] = field(default_factory=list)  # "snapshot id: path" of each lost entry


def repair_snapshots(
    repo: Repository, *, dry_run: bool = False, events: EventSink = ignore_events
) -> RepairSnapshotsResult:
    """Rewrite every snapshot that refers to lost data: files with a lost blob and directories
    whose tree is lost are dropped, each named; the rewritten snapshot replaces the old one."""
    res = RepairSnapshotsResult()
    index = repo.reload_index()
    session = None if dry_run else repo.write_session()

    def fix_tree(tree_id: bytes, path: str, snap: Snapshot, memo: dict[bytes, bytes]) -> bytes:
        if tree_id in memo:
            return memo[tree_id]
        nodes = repo.read_tree(tree_id)
        out: list[Node] = []
        changed = False
        for n in nodes:
            npath = f"{path}/{os.fsdecode(n.name)}"
            if n.type == "dir" and n.subtree is not None:
                try:
                    sub = fix_tree(n.subtree, npath, snap, memo)
                except SafeholdError:
                    res.dropped.append(f"{snap.id[:8]}: {npath}/ (directory unreadable)")
                    changed = True
                    continue
                if sub != n.subtree:
                    n = dataclasses.replace(n, subtree=sub)
                    changed = True
            elif n.content and any(c not in index for c in n.content):
                res.dropped.append(f"{snap.id[:8]}: {npath} (data lost)")
                changed = True
                continue
            out.append(n)
        new_id = tree_id
        if changed:
            data = tree_to_bytes(out)
            new_id = (
                repo.write_session().blob_id(data)
                if session is None
                else session.add_blob(BlobType.TREE, data, Compression("zstd", 3))[0]
            )
        memo[tree_id] = new_id
        return new_id

    memo: dict[bytes, bytes] = {}
    for snap in repo.snapshots():
        before = len(res.dropped)
        try:
            root = fix_tree(snap.tree, "", snap, memo)
        except SafeholdError:
            res.dropped.append(f"{snap.id[:8]}: / (root tree unreadable)")
            root = None
        if len(res.dropped) == before:
            continue
        for line in res.dropped[before:]:
            events(Event("warning", f"dropped {line}"))
        if dry_run:
            res.rewritten[snap.id] = ""
            continue
        assert session is not None
        if root is None:
            root = session.add_blob(BlobType.TREE, tree_to_bytes([]), Compression("zstd", 3))[0]
        session.flush()
        new = dataclasses.replace(snap, tree=root, tags=sorted({*snap.tags, "repaired"}), id="")
        new_id = repo.save_snapshot(new)
        repo.backend.delete(snapshot_name(snap.id))
        res.rewritten[snap.id] = new_id
    if session is not None:
        session.flush()
    return res
