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
from safehold.format.tree import Node, tree_from_bytes, tree_to_bytes
from safehold.ids import BlobType, index_name, name_to_id, snapshot_name
from safehold.repository.index import BlobLocation, MasterIndex
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


def present_blobs(repo: Repository, index: MasterIndex) -> dict[bytes, list[BlobLocation]]:
    """Every place, in a pack that is in storage, where the index says a blob is: live packs and
    the packs that only superseded index objects list (condemned by prune, not deleted yet)
    alike. A blob not in it is lost."""
    stored = {name_to_id(i.name) for i in repo.backend.list("data/")}
    out: dict[bytes, list[BlobLocation]] = {}
    for p in (*index.packs(), *index.old_packs()):
        if p.pack_id.hex() in stored:
            for b in p.blobs:
                out.setdefault(b.id, []).append(BlobLocation(p.pack_id, b))
    return out


@dataclass(frozen=True, slots=True)
class _Fixed:
    """A tree after repair: its new id (None: unreadable) and what was dropped below it, as
    (path relative to the tree, reason)."""

    tree: bytes | None
    dropped: tuple[tuple[str, str], ...] = ()


def repair_snapshots(
    repo: Repository, *, dry_run: bool = False, events: EventSink = ignore_events
) -> RepairSnapshotsResult:
    """Rewrite every snapshot that refers to lost data: files with a blob that no pack in
    storage holds and directories whose tree is lost are dropped, each named; the rewritten
    snapshot replaces the old one. A subtree shared by several snapshots is repaired once and
    every snapshot that holds it is rewritten."""
    res = RepairSnapshotsResult()
    index = repo.reload_index()
    present = present_blobs(repo, index)
    session = None if dry_run else repo.write_session()
    hasher = repo.write_session() if session is None else session
    memo: dict[bytes, _Fixed] = {}

    def read_tree(tree_id: bytes) -> list[Node] | None:
        """The tree, from any pack in storage that holds it (None if none can be read)."""
        if tree_id not in present:
            return None
        try:
            return repo.read_tree(tree_id)
        except SafeholdError:
            pass
        for loc in present[tree_id]:  # the index may prefer a copy that is lost or damaged
            try:
                for _, data in repo.read_pack_blobs(loc.pack_id, [loc.entry]):
                    return tree_from_bytes(data)
            except SafeholdError:
                continue
        return None

    def fix_tree(tree_id: bytes) -> _Fixed:
        got = memo.get(tree_id)
        if got is not None:
            return got
        nodes = read_tree(tree_id)
        if nodes is None:
            memo[tree_id] = _Fixed(None)
            return memo[tree_id]
        out: list[Node] = []
        dropped: list[tuple[str, str]] = []
        for n in nodes:
            name = f"/{os.fsdecode(n.name)}"
            if n.type == "dir" and n.subtree is not None:
                sub = fix_tree(n.subtree)
                if sub.tree is None:
                    dropped.append((f"{name}/", "directory unreadable"))
                    continue
                dropped += [(name + p, why) for p, why in sub.dropped]
                if sub.tree != n.subtree:
                    n = dataclasses.replace(n, subtree=sub.tree)
            elif n.content and any(c not in present for c in n.content):
                dropped.append((name, "data lost"))
                continue
            out.append(n)
        new_id = tree_id
        if dropped:
            data = tree_to_bytes(out)
            new_id = (
                hasher.blob_id(data)
                if session is None
                else session.add_blob(BlobType.TREE, data, Compression("zstd", 3))[0]
            )
        memo[tree_id] = _Fixed(new_id, tuple(dropped))
        return memo[tree_id]

    for snap in repo.snapshots():
        fixed = fix_tree(snap.tree)
        if fixed.tree is None:
            lines = [f"{snap.id[:8]}: / (root tree unreadable)"]
        else:
            lines = [f"{snap.id[:8]}: {p} ({why})" for p, why in fixed.dropped]
        if fixed.tree == snap.tree:
            continue
        res.dropped += lines
        for line in lines:
            events(Event("warning", f"dropped {line}"))
        if session is None:
            res.rewritten[snap.id] = ""
            continue
        root = fixed.tree
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
