"""Prune: free the data no snapshot references, safely beside running backups.

Two phases with a grace period (docs/format.md, "Prune"):

1. **Plan and condemn** (:func:`plan_prune`, then :func:`execute_prune`). Find the blobs every
   snapshot references; condemn packs that hold none of them; repack partly used packs (their
   live blobs copied into new packs) until the unused share is within ``max_unused``. Store a new
   index object listing every pack that stays, superseding all index objects read, then a plan
   object naming the condemned packs, and record the other clients' locks at that moment. From
   then on, readers still find condemned packs (through the superseded index objects) but no
   writer deduplicates against them.
2. **Delete** (:func:`finish_plans`, run by every prune before it plans). A plan is due once its
   grace period has passed and no lock remains that was taken before its deadline. Then it checks
   again: an index object that appeared since the plan and lists a condemned pack, or a snapshot
   that appeared since and uses a blob found only in condemned packs, takes those packs off the
   plan (indexed anew). Only then are the packs deleted, then the superseded index objects, then
   the plan object. A kill at any point leaves a repository that checks clean; the next prune
   finishes the work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from safehold.compress import Compression
from safehold.errors import BackendError, NotFound, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.plan import PlanFile
from safehold.format.snapshot import Snapshot
from safehold.ids import BlobType, index_name, name_to_id, pack_name, plan_name, storage_id
from safehold.repository.locks import RepositoryLock, list_locks
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository

DEFAULT_GRACE_S = 600.0
"""Twice the lock lease: a backup that read the old index has finished or lost its lease."""


@dataclass
class PruneOptions:
    max_unused: float = 0.05  # the share of unused bytes (of used bytes) left in place
    dry_run: bool = False
    grace_s: float = DEFAULT_GRACE_S


@dataclass
class PrunePlan:
    referenced: set[bytes]
    keep: list[IndexedPack]
    repack: list[IndexedPack]
    condemn: list[str]  # pack ids: unreferenced packs, and those to repack (after repacking)
    unindexed: list[str]  # packs in storage that no live index lists
    superseded: list[str]  # index ids the new index replaces
    snapshots: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    missing: list[bytes] = field(default_factory=list)  # referenced blobs no pack holds
    used_in: dict[bytes, bytes] = field(default_factory=dict)  # blob -> the pack it is kept in


@dataclass
class PruneResult:
    plan_id: str | None = None
    repacked_blobs: int = 0
    deleted_packs: int = 0
    deleted_bytes: int = 0
    not_deleted: list[str] = field(default_factory=list)
    plans_finished: int = 0
    plans_waiting: int = 0
    rescued_packs: int = 0


def parse_max_unused(text: str) -> float:
    t = text.strip()
    if t == "unlimited":
        return float("inf")
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UsageError(f"invalid --max-unused {text!r} (e.g. 5% or unlimited)") from None
    if value < 0:
        raise UsageError("--max-unused must not be negative")
    return value


def referenced_blobs(repo: Repository, snapshots: Iterable[Snapshot]) -> set[bytes]:
    """Every tree and data blob the snapshots reach."""
    seen: set[bytes] = set()
    for snap in snapshots:
        stack = [snap.tree]
        while stack:
            tid = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            for node in repo.read_tree(tid):
                if node.subtree is not None:
                    stack.append(node.subtree)
                if node.content:
                    seen.update(node.content)
    return seen


def plan_prune(repo: Repository, opts: PruneOptions) -> PrunePlan:
    """Decide what prune does; reads only."""
    index = repo.reload_index()
    snapshots = repo.snapshots()
    referenced = referenced_blobs(repo, snapshots)
    live = index.packs()
    # a blob in several packs counts as used in one of them only: prefer the fuller pack
    used_in: dict[bytes, bytes] = {}
    order = sorted(live, key=lambda p: -sum(1 for b in p.blobs if b.id in referenced))
    for p in order:
        for b in p.blobs:
            if b.id in referenced and b.id not in used_in:
                used_in[b.id] = p.pack_id
    keep, partial, condemn = [], [], []
    used_total = 0
    for p in live:
        used = sum(b.length for b in p.blobs if used_in.get(b.id) == p.pack_id)
        unused = sum(b.length for b in p.blobs) - used  # pack headers are not "unused"
        if used == 0:
            condemn.append(p.pack_id.hex())
            continue
        used_total += used
        if unused > 0:
            partial.append((unused, p))
        else:
            keep.append(p)
    # repack the packs with the most unused bytes until what is left is within max_unused
    partial.sort(key=lambda x: -x[0])
    left = sum(u for u, _ in partial)
    repack = []
    for unused, p in partial:
        if left <= opts.max_unused * used_total:
            keep.append(p)
        else:
            repack.append(p)
            left -= unused
    live_ids = {p.pack_id.hex() for p in live}
    old_ids = {p.pack_id.hex() for p in index.old_packs()}  # condemned by an earlier prune
    stored = {name_to_id(i.name): i.size for i in repo.backend.list("data/")}
    unindexed = sorted(pid for pid in stored if pid not in live_ids)
    missing = [b for b in referenced if b not in used_in]
    plan = PrunePlan(
        referenced=referenced,
        keep=keep,
        repack=repack,
        condemn=sorted(set(condemn) | {p.pack_id.hex() for p in repack} | set(unindexed)),
        unindexed=unindexed,
        superseded=sorted(index.index_ids),
        snapshots=[s.id for s in snapshots],
        missing=missing,
        used_in=used_in,
    )
    size_of = {p.pack_id.hex(): p.size for p in live} | stored
    repacked_used = sum(b.length for p in repack for b in p.blobs if used_in.get(b.id) == p.pack_id)
    plan.stats = {
        "packs": len(stored),
        "bytes": sum(stored.values()),
        "used_bytes": used_total,
        "unused_bytes_kept": left,
        "packs_to_delete": len(plan.condemn) - len(repack),
        "packs_to_repack": len(repack),
        "bytes_to_repack": sum(p.size for p in repack),
        "bytes_freed": sum(size_of.get(pid, 0) for pid in plan.condemn) - repacked_used,
        "unindexed_packs": len([u for u in unindexed if u not in old_ids]),
    }
    return plan


def execute_prune(
    repo: Repository,
    plan: PrunePlan,
    lock: RepositoryLock,
    *,
    events: EventSink = ignore_events,
) -> PruneResult:
    """Phase 1: repack, write the superseding index, store the plan object. Deletes nothing."""
    if plan.missing:
        raise SafeholdError(
            f"{len(plan.missing)} blobs that snapshots use are in no pack: run check and repair "
            "before prune (nothing was changed)"
        )
    res = PruneResult()
    if not plan.condemn and not plan.superseded:
        return res
    session = repo.write_session(index_flush_packs=1 << 30, index_flush_seconds=1e9)
    for p in plan.repack:
        wanted = [b for b in p.blobs if plan.used_in.get(b.id) == p.pack_id]
        for entry, data in repo.read_pack_blobs(p.pack_id, wanted):
            session.add_blob(BlobType(entry.type), data, Compression("auto"), entry.id, dedup=False)
            res.repacked_blobs += 1
    session.flush()
    # one index object for every pack that stays, superseding every index object read
    index = repo.index
    repacked = {p.pack_id for p in plan.repack}
    condemned = {bytes.fromhex(c) for c in plan.condemn}
    stay = [p for p in index.packs() if p.pack_id not in condemned and p.pack_id not in repacked]
    new_index = IndexFile(stay, [bytes.fromhex(i) for i in plan.superseded])
    new_id = repo.store_index(new_index)
    events(Event("info", f"stored index {new_id[:8]} with {len(stay)} packs"))
    plan_file = PlanFile(
        time_ns=time.time_ns(),
        condemned=sorted(condemned),
        superseded=[bytes.fromhex(i) for i in plan.superseded],
        indexes=[bytes.fromhex(i) for i in sorted(set(repo.list_ids("index/")))],
        snapshots=[bytes.fromhex(s) for s in plan.snapshots],
    )
    # the locks that exist once the new index is visible: the plan waits for all of them
    plan_file.locks = sorted(
        lk.lock_id for lk in list_locks(repo.backend) if lk.lock_id != lock.lock_id
    )
    data = meta_object(plan_file.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
    res.plan_id = storage_id(data)
    repo.backend.store(plan_name(res.plan_id), data)
    events(Event("info", f"condemned {len(condemned)} packs (plan {res.plan_id[:8]})"))
    return res


def _read_plan(repo: Repository, plan_id: str) -> PlanFile:
    data = repo.load_verified(plan_name(plan_id))
    return PlanFile.from_bytes(repo.open_meta(data, Kind.PLAN, plan_name(plan_id)))


def finish_plans(
    repo: Repository,
    lock: RepositoryLock,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    now: float | None = None,
    events: EventSink = ignore_events,
) -> PruneResult:
    """Phase 2: delete what due plans condemned, after checking nothing came to need it."""
    res = PruneResult()
    for plan_id in repo.list_ids("plans/"):
        try:
            plan = _read_plan(repo, plan_id)
        except NotFound:
            continue
        t = time.time() if now is None else now
        deadline = plan.time_ns / 1e9 + grace_s
        others = [
            lk for lk in list_locks(repo.backend) if lk.lock_id != lock.lock_id and not lk.stale()
        ]
        waiting = [lk for lk in others if lk.lock_id in plan.locks or lk.time < deadline]
        if t < deadline or waiting:
            res.plans_waiting += 1
            why = f"{len(waiting)} locks" if waiting else f"{deadline - t:.0f}s of grace"
            events(Event("info", f"plan {plan_id[:8]} waits ({why})"))
            continue
        _finish(repo, plan_id, plan, res, events)
        res.plans_finished += 1
    return res


def _finish(
    repo: Repository, plan_id: str, plan: PlanFile, res: PruneResult, events: EventSink
) -> None:
    condemned = {c.hex() for c in plan.condemned}
    index = repo.reload_index()
    # 1. an index object that appeared since lists a condemned pack: it is live again
    known = {i.hex() for i in plan.indexes}
    for iid in repo.list_ids("index/"):
        if iid not in known:
            for p in repo.read_index_file(iid, use_cache=False).packs:
                condemned.discard(p.pack_id.hex())
    # 2. a snapshot that appeared since uses a blob found only in condemned packs: keep those
    # packs, and index them again so that they stay findable
    known_snaps = {s.hex() for s in plan.snapshots}
    new_snaps = [repo.load_snapshot(s) for s in repo.list_ids("snapshots/") if s not in known_snaps]
    rescue: dict[bytes, IndexedPack] = {}
    if new_snaps:
        # the condemned packs' contents, from the packs themselves (index objects that listed
        # them may be gone already), so that the new snapshots' trees can be walked
        in_condemned: dict[bytes, IndexedPack] = {}
        for pid in sorted(condemned):
            try:
                pack = repo.read_pack_index(pid)
            except NotFound:
                continue
            index.add_pack(pack, live=False)
            for e in pack.blobs:
                in_condemned.setdefault(e.id, pack)
        for blob in referenced_blobs(repo, new_snaps):
            if blob not in index and blob in in_condemned:
                pack = in_condemned[blob]
                rescue[pack.pack_id] = pack
    if rescue:
        repo.store_index(IndexFile(list(rescue.values())))
        for rescued in rescue:
            condemned.discard(rescued.hex())
        res.rescued_packs += len(rescue)
        events(Event("info", f"kept {len(rescue)} condemned packs that a new snapshot uses"))
    # 3. delete: packs, then the superseded index objects, then the plan
    for pid in sorted(condemned):
        name = pack_name(pid)
        try:
            size = repo.backend.stat(name).size
            repo.backend.delete(name)
            res.deleted_packs += 1
            res.deleted_bytes += size
        except NotFound:
            pass
        except BackendError as e:
            res.not_deleted.append(f"{name}: {e}")
    for old in plan.superseded:
        try:
            repo.backend.delete(index_name(old.hex()))
        except NotFound:
            pass
        except BackendError as e:
            res.not_deleted.append(f"{index_name(old.hex())}: {e}")
    if not res.not_deleted:
        try:
            repo.backend.delete(plan_name(plan_id))
        except (NotFound, BackendError) as e:
            res.not_deleted.append(f"{plan_name(plan_id)}: {e}")
    events(Event("info", f"plan {plan_id[:8]}: deleted {res.deleted_packs} packs"))


def prune(
    repo: Repository,
    opts: PruneOptions,
    *,
    events: EventSink = ignore_events,
    lock: RepositoryLock | None = None,
) -> tuple[PrunePlan, PruneResult]:
    """Finish due plans, plan, condemn, and delete at once what is already safe to delete.

    With ``dry_run`` only the plan is made. ``lock`` is a held prune lock (one is taken if
    not given)."""
    own = lock is None
    held = repo.lock(op="prune") if lock is None else lock
    try:
        total = PruneResult()
        if not opts.dry_run:
            _merge(total, finish_plans(repo, held, grace_s=opts.grace_s, events=events))
        plan = plan_prune(repo, opts)
        if opts.dry_run:
            return plan, total
        res = execute_prune(repo, plan, held, events=events)
        total.plan_id, total.repacked_blobs = res.plan_id, res.repacked_blobs
        _merge(total, finish_plans(repo, held, grace_s=opts.grace_s, events=events))
        return plan, total
    finally:
        if own:
            held.release()


def _merge(into: PruneResult, other: PruneResult) -> None:
    into.deleted_packs += other.deleted_packs
    into.deleted_bytes += other.deleted_bytes
    into.not_deleted += other.not_deleted
    into.plans_finished += other.plans_finished
    into.plans_waiting = other.plans_waiting
    into.rescued_packs += other.rescued_packs
