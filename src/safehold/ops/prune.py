"""Prune: free the data no snapshot references, safely beside running backups.

Two phases (docs/format.md §15.2):

1. **Plan and condemn** (:func:`plan_prune`, then :func:`execute_prune`). Find the blobs every
   snapshot references; condemn packs that hold none of them; repack partly used packs (their
   live blobs copied into new packs) until the unused share is within ``max_unused``. Store a new
   index object listing every pack that stays (claiming to supersede every index object read),
   list the other clients' locks, then store the plan object: the authority that makes the
   supersession real. Nothing is deleted in this phase.
2. **Delete** (:func:`finish_plans`). A plan is due once every lock it recorded is gone (and,
   where listings may lag, a grace period has passed). Deletion never trusts the plan's word: from
   the index objects, plans and snapshots present *now*, prune re-derives that each condemned
   pack is unreferenced: no index object other than those the plan supersedes lists it, and every
   blob in it (read from the pack's own header) that a present snapshot uses is held by a pack
   that stays, as that pack's own header confirms. Packs that fail either test are kept (indexed
   anew if needed). Then the packs are deleted, then the superseded index objects that list
   nothing still needed, then the plan. A kill at any point leaves a repository that checks
   clean; the next prune finishes the work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from safehold.backends.base import Backend, clean_temporaries
from safehold.compress import Compression
from safehold.errors import BackendError, IntegrityError, NotFound, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.plan import PlanFile
from safehold.format.snapshot import Snapshot
from safehold.ids import BlobType, index_name, is_hex_id, pack_name, plan_name, storage_id
from safehold.repository.locks import LockInfo, RepositoryLock, list_locks
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository

DEFAULT_GRACE_S = 600.0
"""Where listings may lag: twice the lock lease, far longer than any listing lags."""
TEMPORARY_AGE_S = 86400.0
"""Temporaries of interrupted stores older than this are removed."""


def listings_consistent(backend: Backend) -> bool:
    """Whether a listing shows every object stored before it began: a backend (or what a
    wrapper wraps, through ``inner``) says so with ``consistent_listing``. Where it may not, as
    on many rclone remotes, prune waits a grace period as well as for the locks."""
    b: object = backend
    for _ in range(16):  # wrappers nest a few deep at most
        flag = getattr(b, "consistent_listing", None)
        if isinstance(flag, bool):
            return flag
        b = getattr(b, "inner", None)
        if b is None:
            break
    return False


@dataclass
class PruneOptions:
    max_unused: float = 0.05  # the share of unused bytes (of used bytes) left in place
    dry_run: bool = False
    grace_s: float | None = None  # None: 0 where listings are consistent, else DEFAULT_GRACE_S


@dataclass
class PrunePlan:
    referenced: set[bytes]
    keep: list[IndexedPack]
    repack: list[IndexedPack]
    condemn: list[str]  # pack ids condemned now: unreferenced packs, and those to repack
    unindexed: list[str]  # packs in storage that no live index lists (and no plan condemns)
    superseded: list[str]  # index ids the new index replaces
    snapshots: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    missing: list[bytes] = field(default_factory=list)  # referenced blobs no pack holds
    used_in: dict[bytes, bytes] = field(default_factory=dict)  # blob -> the pack it is kept in
    revived: list[IndexedPack] = field(default_factory=list)  # condemned earlier, used again
    stray: list[str] = field(default_factory=list)  # names under data/ that are not packs
    unreadable: dict[str, str] = field(default_factory=dict)  # plans that cannot be read


@dataclass
class PruneResult:
    plan_id: str | None = None
    condemned_packs: int = 0
    condemned_bytes: int = 0
    repacked_blobs: int = 0
    deleted_packs: int = 0
    deleted_bytes: int = 0
    deleted_indexes: int = 0
    not_deleted: list[str] = field(default_factory=list)
    plans_finished: list[str] = field(default_factory=list)
    plans_waiting: int = 0
    waiting: list[str] = field(default_factory=list)  # why each waiting plan waits
    waiting_bytes: int = 0  # what the waiting plans will free
    rescued_packs: int = 0  # condemned packs kept because something uses them after all
    kept_unreadable: list[str] = field(default_factory=list)
    temporaries_removed: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


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
    """Every tree and data blob the snapshots reach (raises if a tree cannot be read)."""
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


def _stored_packs(repo: Repository) -> tuple[dict[str, int], list[str]]:
    """Packs in storage (id -> size), and names under ``data/`` that are not packs."""
    stored: dict[str, int] = {}
    stray: list[str] = []
    for info in repo.backend.list("data/"):
        parts = info.name.split("/")
        if len(parts) == 3 and is_hex_id(parts[2]) and parts[1] == parts[2][:2]:
            stored[parts[2]] = info.size
        else:
            stray.append(info.name)
    return stored, sorted(stray)


def _readable_snapshots(repo: Repository) -> list[Snapshot]:
    """Every snapshot; IntegrityError if any snapshot object cannot be read (prune cannot know
    what it uses, so it changes nothing until the object is removed)."""
    snapshots = repo.snapshots()
    if repo.bad_snapshots:
        name, err = sorted(repo.bad_snapshots.items())[0]
        raise IntegrityError(
            f"{len(repo.bad_snapshots)} snapshot objects cannot be read (e.g. {name}: {err}); "
            "prune cannot know what they use and changes nothing until they are removed "
            "(safehold forget ID, or repair snapshots --forget-originals)"
        )
    return snapshots


def _refuse_if_unreadable(repo: Repository) -> None:
    bad = {n: e for n, e in repo.index.state.unreadable.items() if n.startswith("index/")}
    if bad:
        name, err = sorted(bad.items())[0]
        raise SafeholdError(
            f"{len(bad)} index objects cannot be read (e.g. {name}: {err}); prune changes "
            "nothing until they are repaired (safehold repair index)"
        )


def _revive(
    repo: Repository, wanted: set[bytes], stored: dict[str, int], used_in: dict[bytes, bytes]
) -> dict[bytes, IndexedPack]:
    """Packs in storage, listed only by superseded index objects, that hold ``wanted`` blobs
    (a backup reused them while a plan waited), as their own headers describe them; notes in
    ``used_in`` where each blob found is kept."""
    revived: dict[bytes, IndexedPack] = {}
    state = repo.index.state
    for iid in sorted(state.superseded):
        for p in state.files[iid].packs:
            if not wanted:
                return revived
            pid = p.pack_id.hex()
            if pid not in stored or p.pack_id in revived:
                continue
            if not any(e.id in wanted for e in p.blobs):
                continue
            try:
                own = repo.read_pack_index(pid)  # the header, not a listing that may be forged
            except SafeholdError:
                continue
            found = {e.id for e in own.blobs} & wanted
            if found:
                revived[p.pack_id] = own
                wanted -= found
                for b in found:
                    used_in[b] = p.pack_id
    return revived


def plan_prune(repo: Repository, opts: PruneOptions) -> PrunePlan:
    """Decide what prune does; reads only."""
    # snapshots first, then the index: a backup stores its index objects before its snapshot,
    # so every snapshot listed here has its blobs in the index loaded after
    snapshots = _readable_snapshots(repo)
    index = repo.reload_index()
    _refuse_if_unreadable(repo)
    plans = index.state.plan_files
    referenced = referenced_blobs(repo, snapshots)
    live = index.packs()
    stored, stray = _stored_packs(repo)
    # a blob in several packs counts as used in one of them only: prefer the fuller pack
    # (a copy known to be damaged counts only where no undamaged copy exists: then it is kept
    # as it is, never repacked, as it may still be mended; docs/format.md §9.4)
    used_in: dict[bytes, bytes] = {}
    order = sorted(live, key=lambda p: -sum(1 for b in p.blobs if b.id in referenced))
    for good_only in (True, False):
        for p in order:
            for b in p.blobs:
                if b.id not in referenced or b.id in used_in:
                    continue
                if good_only and index.is_damaged(p.pack_id, b.id):
                    continue
                used_in[b.id] = p.pack_id
    holds_damaged = {
        p.pack_id
        for p in live
        if any(
            used_in.get(b.id) == p.pack_id and index.is_damaged(p.pack_id, b.id) for b in p.blobs
        )
    }
    # a damage record steers which copy is kept, and a record can be wrong or forged: the copy
    # chosen instead of a recorded one is read now; if it fails, the recorded copy (which may
    # be good after all) is the one kept, as it is
    for pack_id, blob_id in sorted(index.damaged()):
        chosen = used_in.get(blob_id)
        if chosen is None or chosen == pack_id or index.pack(pack_id) is None:
            continue
        pack = index.pack(chosen)
        entry = next((e for e in pack.blobs if e.id == blob_id), None) if pack else None
        if entry is not None and not repo.copy_is_good(chosen, entry):
            repo.note_damaged(chosen, [blob_id], "prune: the copy it would keep does not verify")
            used_in[blob_id] = pack_id
            holds_damaged.add(pack_id)
    # a blob found only in a pack an earlier plan condemned (a backup reused it while the plan
    # waited): that pack is live again, listed by the new index
    revived = _revive(repo, {b for b in referenced if b not in used_in}, stored, used_in)
    keep, partial, condemn = list(revived.values()), [], []
    used_total = 0
    for p in live:
        used = sum(b.length for b in p.blobs if used_in.get(b.id) == p.pack_id)
        unused = sum(b.length for b in p.blobs) - used  # pack headers are not "unused"
        if used == 0:
            condemn.append(p.pack_id.hex())
            continue
        used_total += used
        if unused > 0 and p.pack_id not in holds_damaged:
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
    live_ids = {p.pack_id.hex() for p in live} | {p.hex() for p in revived}
    already = {c.hex() for pl in plans.values() for c in pl.condemned}
    unindexed = sorted(pid for pid in stored if pid not in live_ids and pid not in already)
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
        revived=list(revived.values()),
        stray=stray,
        unreadable=dict(index.state.unreadable),
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
        "bytes_freed": max(
            0, sum(size_of.get(pid, 0) for pid in plan.condemn if pid in stored) - repacked_used
        ),
        "bytes_condemned": sum(stored.get(pid, 0) for pid in plan.condemn),
        "unindexed_packs": len(unindexed),
        "packs_waiting": len(already & set(stored)),
        "bytes_waiting": sum(stored[p] for p in already if p in stored),
        "revived_packs": len(revived),
    }
    return plan


def execute_prune(
    repo: Repository,
    plan: PrunePlan,
    lock: RepositoryLock,
    *,
    grace_s: float = 0.0,
    events: EventSink = ignore_events,
) -> PruneResult:
    """Phase 1: repack, write the new index, store the plan object. Deletes nothing."""
    if plan.missing:
        raise SafeholdError(
            f"{len(plan.missing)} blobs that snapshots use are in no pack: run check and repair "
            "before prune (nothing was changed)"
        )
    res = PruneResult()
    if plan.revived:
        # packs an earlier plan condemned that snapshots use after all: listed by an index
        # object of their own, which no plan supersedes, they are live again at once
        revived_ids = {p.pack_id for p in plan.revived}
        repo.store_index(
            IndexFile(
                plan.revived, damaged=sorted(d for d in repo.index.damaged() if d[0] in revived_ids)
            )
        )
        events(Event("info", f"kept {len(plan.revived)} condemned packs that snapshots use"))
    if not plan.condemn:
        return res  # nothing to condemn: no plan object
    session = repo.write_session(index_flush_packs=1 << 30, index_flush_seconds=1e9)
    for p in plan.repack:
        wanted = [b for b in p.blobs if plan.used_in.get(b.id) == p.pack_id]
        for entry, got in repo.read_pack_blobs(p.pack_id, wanted, errors=True):
            if isinstance(got, IntegrityError):
                # recorded as damaged (the caller saves the record); nothing is deleted
                raise IntegrityError(
                    f"prune found damage while repacking pack {p.pack_id.hex()[:16]}: {got}; run "
                    "'check --read-data', then 'repair index' (nothing was deleted)"
                )
            session.add_blob(BlobType(entry.type), got, Compression("auto"), entry.id, dedup=False)
            res.repacked_blobs += 1
    session.flush()
    # one index object for every pack that stays, claiming to supersede every index object read
    repacked = {p.pack_id for p in plan.repack}
    condemned = {bytes.fromhex(c) for c in plan.condemn}
    stay = [p for p in plan.keep if p.pack_id not in condemned and p.pack_id not in repacked]
    # damage records of packs that stay are carried over (the objects holding them are superseded)
    stay_ids = {p.pack_id for p in stay}
    damaged = sorted(d for d in repo.index.damaged() if d[0] in stay_ids)
    new_index = IndexFile(stay, [bytes.fromhex(i) for i in plan.superseded], damaged)
    new_id = repo.store_index(new_index)
    events(Event("info", f"stored index {new_id[:8]} with {len(stay)} packs"))
    # the locks that exist once the new index is visible: the plan waits for all of them; a
    # client that locks later lists the index after this and does not reuse condemned packs
    others = sorted(lk.lock_id for lk in list_locks(repo.backend) if lk.lock_id != lock.lock_id)
    plan_file = PlanFile(
        time_ns=int(repo.clock.time() * 1e9),
        condemned=sorted(condemned),
        superseded=[bytes.fromhex(i) for i in plan.superseded],
        indexes=[bytes.fromhex(i) for i in sorted(set(repo.list_ids("index/")))],
        snapshots=[bytes.fromhex(s) for s in plan.snapshots],
        locks=others,
        grace_s=grace_s,
    )
    data = meta_object(plan_file.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
    res.plan_id = storage_id(data)
    repo.backend.store(plan_name(res.plan_id), data)
    res.condemned_packs = len(condemned)
    res.condemned_bytes = plan.stats.get("bytes_condemned", 0)
    events(Event("info", f"condemned {len(condemned)} packs (plan {res.plan_id[:8]})"))
    return res


def _why_waiting(
    plan: PlanFile, others: list[LockInfo], now: float, grace_s: float
) -> tuple[str | None, list[LockInfo]]:
    """Why a plan is not due yet (None if it is due), and the locks it waits for."""
    deadline = plan.time_ns / 1e9 + grace_s
    waiting = [lk for lk in others if lk.lock_id in plan.locks or lk.time < deadline]
    if waiting:
        names = ", ".join(f"{lk.user}@{lk.host} pid {lk.pid}" for lk in waiting[:3])
        return f"waits for {len(waiting)} clients that may still use its packs ({names})", waiting
    if now < deadline:
        return f"waits {deadline - now:.0f}s more (grace period)", []
    return None, []


def finish_plans(
    repo: Repository,
    lock: RepositoryLock | None = None,
    *,
    grace_s: float = 0.0,
    events: EventSink = ignore_events,
) -> PruneResult:
    """Phase 2: delete what due plans condemned, after re-deriving that nothing needs it.
    ``lock`` is a held prune lock (one is taken, and released, if not given)."""
    if lock is None:
        held = repo.lock(op="prune")
        try:
            return _finish_plans(repo, held, grace_s, events)
        finally:
            held.release()
    return _finish_plans(repo, lock, grace_s, events)


def _finish_plans(
    repo: Repository, lock: RepositoryLock, grace_s: float, events: EventSink
) -> PruneResult:
    res = PruneResult()
    plans, bad = repo.load_plans()
    for name, err in sorted(bad.items()):
        res.unreadable.append(f"{name}: {err}")
        events(Event("warning", f"{name} cannot be read and is ignored: {err}"))
    for plan_id, plan in sorted(plans.items(), key=lambda kv: kv[1].time_ns):
        now = repo.clock.time()
        others = [
            lk
            for lk in list_locks(repo.backend)
            if lk.lock_id != lock.lock_id and not lk.stale(now)
        ]
        why, _ = _why_waiting(plan, others, now, grace_s)
        if why is not None:
            res.plans_waiting += 1
            res.waiting.append(f"plan {plan_id[:8]} {why}")
            events(Event("info", f"plan {plan_id[:8]} {why}"))
            continue
        _finish(repo, plan_id, plan, res, events)
    if res.plans_waiting:
        stored, _ = _stored_packs(repo)
        plans_now, _ = repo.load_plans()
        res.waiting_bytes = sum(
            stored.get(c.hex(), 0) for p in plans_now.values() for c in set(p.condemned)
        )
    return res


def _finish(
    repo: Repository, plan_id: str, plan: PlanFile, res: PruneResult, events: EventSink
) -> None:
    """Carry out one due plan, deleting only what is provably unreferenced now."""
    # everything is listed afresh, after the plan was found due: snapshots first, then the
    # index objects (stored before any snapshot that needs them), then the plans and the packs
    snapshots = _readable_snapshots(repo)
    index = repo.reload_index()
    _refuse_if_unreadable(repo)
    files, plans = index.state.files, index.state.plan_files
    referenced = referenced_blobs(repo, snapshots)
    stored, _ = _stored_packs(repo)
    superseded = {s.hex() for s in plan.superseded}
    condemned = {c.hex() for c in plan.condemned}
    doomed = {c.hex() for p in plans.values() for c in p.condemned} | condemned

    # (a) a pack listed by an index object this plan does not supersede is live: keep it
    protected: set[str] = set()
    holders: dict[bytes, list[str]] = {}
    for iid, f in files.items():
        for p in f.packs:
            pid = p.pack_id.hex()
            if iid not in superseded:
                protected.add(pid)
            for b in p.blobs:
                holders.setdefault(b.id, []).append(pid)
    candidates = sorted(c for c in condemned if c in stored and c not in protected)

    # (b) a pack holding a blob that a present snapshot uses, which no pack that stays holds
    # (by that pack's own header), is kept
    headers: dict[str, IndexedPack | None] = {}

    def header(pid: str) -> IndexedPack | None:
        if pid not in headers:
            try:
                headers[pid] = repo.read_pack_index(pid)
            except SafeholdError:
                headers[pid] = None
        return headers[pid]

    verified: dict[bytes, bool] = {}

    def held(blob_id: bytes) -> bool:
        """Whether a pack that stays holds the blob, by that pack's own header."""
        if blob_id not in verified:
            verified[blob_id] = any(
                h not in doomed
                and h in stored
                and (hh := header(h)) is not None
                and any(x.id == blob_id for x in hh.blobs)
                for h in holders.get(blob_id, [])
            )
        return verified[blob_id]

    keep: set[str] = set()
    unreadable = [pid for pid in candidates if header(pid) is None]
    # a pack whose header cannot be read (damaged; its good blobs copied by repair index) may
    # go only if every blob a present snapshot uses is held by a pack that stays
    if unreadable and not all(held(b) for b in referenced):
        for pid in unreadable:
            keep.add(pid)
            res.kept_unreadable.append(pid)
            events(Event("warning", f"condemned pack {pid[:16]} cannot be read: kept"))
    for pid in candidates:
        hp = headers.get(pid)
        if hp is None:
            continue
        for e in hp.blobs:
            if e.id in referenced and not held(e.id):
                keep.add(pid)
                break
    # kept packs that no live index object lists are indexed anew, so that they stay findable
    rescue = [hp for pid in sorted(keep) if (hp := headers.get(pid)) is not None]
    if rescue:
        repo.store_index(IndexFile(rescue))
        protected |= {p.pack_id.hex() for p in rescue}
        res.rescued_packs += len(rescue)
        events(Event("info", f"kept {len(rescue)} condemned packs that snapshots use"))

    # (c) last before deleting: index objects stored since the listing above protect what they
    # list. Only a writer whose lease lapsed stores one now (it withdraws it at once, unless it
    # dies first): the window left is the one between this listing and the deletions below
    for iid in sorted(set(repo.list_ids("index/")) - set(files)):
        try:
            late = repo.read_index_file(iid, use_cache=False).packs
        except NotFound:
            continue  # withdrawn meanwhile
        except SafeholdError:  # unreadable: what it lists is unknown, so nothing is deleted
            keep |= set(candidates)
            break
        for p in late:
            keep.add(p.pack_id.hex())
            protected.add(p.pack_id.hex())

    # delete: packs, then the superseded index objects that list nothing still needed, then
    # the plan
    incomplete = bool(keep - protected)
    for pid in candidates:
        if pid in keep:
            continue
        name = pack_name(pid)
        try:
            repo.backend.delete(name)
            res.deleted_packs += 1
            res.deleted_bytes += stored[pid]
            del stored[pid]
        except NotFound:
            stored.pop(pid, None)
        except BackendError as e:
            res.not_deleted.append(f"{name}: {e}")
            incomplete = True
    for old in sorted(superseded & set(files)):
        needed = [
            p.pack_id.hex()
            for p in files[old].packs
            if p.pack_id.hex() in stored and p.pack_id.hex() not in protected
        ]
        if needed:
            incomplete = True
            continue
        try:
            repo.backend.delete(index_name(old))
            res.deleted_indexes += 1
        except NotFound:
            pass
        except BackendError as e:
            res.not_deleted.append(f"{index_name(old)}: {e}")
            incomplete = True
    if not incomplete:
        try:
            repo.backend.delete(plan_name(plan_id))
            res.plans_finished.append(plan_id)
        except NotFound:
            res.plans_finished.append(plan_id)
        except BackendError as e:
            res.not_deleted.append(f"{plan_name(plan_id)}: {e}")
    events(Event("info", f"plan {plan_id[:8]}: deleted {res.deleted_packs} packs"))


def _clean_temporaries(repo: Repository, res: PruneResult, events: EventSink) -> None:
    try:
        res.temporaries_removed = clean_temporaries(repo.backend, TEMPORARY_AGE_S)
    except SafeholdError as e:
        events(Event("warning", f"could not remove old temporary files: {e}"))
    if res.temporaries_removed:
        events(
            Event(
                "info",
                f"removed {len(res.temporaries_removed)} temporary files left by interrupted "
                "stores",
            )
        )


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
    grace = opts.grace_s
    if grace is None:
        grace = 0.0 if listings_consistent(repo.backend) else DEFAULT_GRACE_S
    try:
        total = PruneResult()
        if not opts.dry_run:
            _merge(total, finish_plans(repo, held, grace_s=grace, events=events))
        plan = plan_prune(repo, opts)
        total.stray = plan.stray
        for name in plan.stray:
            events(Event("warning", f"{name} is not a pack (left alone)"))
        if opts.dry_run:
            return plan, total
        res = execute_prune(repo, plan, held, grace_s=grace, events=events)
        total.plan_id, total.repacked_blobs = res.plan_id, res.repacked_blobs
        total.condemned_packs, total.condemned_bytes = res.condemned_packs, res.condemned_bytes
        later = finish_plans(repo, held, grace_s=grace, events=events)
        _merge(total, later)
        total.plans_waiting, total.waiting = later.plans_waiting, later.waiting
        total.waiting_bytes = later.waiting_bytes
        total.unreadable = later.unreadable
        _clean_temporaries(repo, total, events)
        return plan, total
    finally:
        if own:
            held.release()


def _merge(into: PruneResult, other: PruneResult) -> None:
    into.deleted_packs += other.deleted_packs
    into.deleted_bytes += other.deleted_bytes
    into.deleted_indexes += other.deleted_indexes
    into.not_deleted += other.not_deleted
    into.plans_finished += other.plans_finished
    into.rescued_packs += other.rescued_packs
    into.kept_unreadable += other.kept_unreadable
