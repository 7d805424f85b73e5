"""Check: the repository's structure and, optionally, every byte of its data.

Check never trusts the local cache: it reads index objects, snapshots and trees from storage.
Damage is reported with the snapshots and file paths it affects.
"""

from __future__ import annotations

import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from safehold import crypto
from safehold.errors import (
    BackendError,
    FormatError,
    IntegrityError,
    NotFound,
    SafeholdError,
    UsageError,
)
from safehold.events import Event, EventSink, ignore_events
from safehold.format.index import IndexedPack
from safehold.format.pack import (
    HEADER_NONCE,
    PACK_PREFIX_LEN,
    TRAILER,
    PackEntry,
    check_entries,
    header_from_bytes,
    parse_trailer,
)
from safehold.format.snapshot import Snapshot
from safehold.ids import name_to_id, pack_name, storage_hasher
from safehold.repository.repo import Repository
from safehold.units import parse_size


@dataclass
class CheckOptions:
    read_data: bool = False
    subset: str | None = None  # "10%", "n/t" or a byte budget such as "500M"
    state_file: Path | None = None  # remembers which packs a cycle of subsets has read
    workers: int = 2  # each holds one whole pack in memory


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    snapshots: int = 0
    trees: int = 0
    packs: int = 0
    packs_read: int = 0
    bytes_read: int = 0
    blobs: int = 0
    damaged_files: list[str] = field(default_factory=list)
    coverage: float = 0.0  # the share of packs read in the current cycle, this run included
    cycle: int = 1
    cycle_complete: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class Subset:
    """``--read-data-subset``: ``n/t`` (a fixed slice of the packs by id), ``P%`` of the packs,
    or a byte budget like ``500M``. The last two pick packs not yet read in the current cycle
    (remembered in a state file), so repeated runs cover every pack."""

    fraction: float | None = None
    budget: int | None = None
    slice: tuple[int, int] | None = None

    @classmethod
    def parse(cls, spec: str) -> Subset:
        spec = spec.strip()
        bad = f"invalid subset {spec!r} (expected e.g. 10%, 2/5 or 500M)"
        if spec.endswith("%"):
            try:
                pct = float(spec[:-1])
            except ValueError:
                raise UsageError(bad) from None
            if not 0 < pct <= 100:
                raise UsageError("the subset percentage must be above 0 and at most 100")
            return cls(fraction=pct / 100)
        n, sep, t = spec.partition("/")
        if sep:
            if not n.isdigit() or not t.isdigit() or not 1 <= int(n) <= int(t):
                raise UsageError(bad)
            return cls(slice=(int(n), int(t)))
        try:
            return cls(budget=parse_size(spec))
        except UsageError:
            raise UsageError(bad) from None

    def choose(self, packs: dict[str, int], done: set[str]) -> list[str]:
        """The packs to read this time, from ``packs`` (id -> size); ``done`` were read already
        in this cycle."""
        if self.slice is not None:
            n, t = self.slice
            return [p for p in sorted(packs) if int(p[:8], 16) % t == n - 1]
        todo = sorted(p for p in packs if p not in done) or sorted(packs)
        if self.fraction is not None:
            want = max(1, math.ceil(self.fraction * len(packs)))
            return todo[:want]
        assert self.budget is not None
        out: list[str] = []
        total = 0
        for p in todo:
            if out and total + packs[p] > self.budget:
                break
            out.append(p)
            total += packs[p]
        return out


def _load_state(path: Path | None, repo_id: str) -> tuple[int, set[str]]:
    if path is None:
        return 1, set()
    try:
        obj = json.loads(path.read_text())
        if obj.get("repo") == repo_id:
            return int(obj["cycle"]), set(obj["read"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 1, set()


def _save_state(path: Path | None, repo_id: str, cycle: int, read: set[str]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps({"repo": repo_id, "cycle": cycle, "read": sorted(read)}))
        os.replace(tmp, path)
    except OSError:
        pass  # the coverage state is a convenience: losing it restarts the cycle


def check(
    repo: Repository,
    opts: CheckOptions | None = None,
    *,
    events: EventSink = ignore_events,
) -> CheckResult:
    opts = opts or CheckOptions()
    res = CheckResult()
    lock = threading.Lock()

    def damage(msg: str) -> None:
        with lock:
            res.errors.append(msg)
        events(Event("damage", msg))

    # 1. plans, then index objects, read from storage (never the cache): the master index
    # loads them in that order (a plan that finishes meanwhile deletes its superseded index
    # objects before itself, so no index object is read as live whose plan was missed)
    state = repo.reload_index(use_cache=False).state
    plans, files = state.plan_files, state.files
    for name, err in sorted(state.unreadable.items()):
        kind = "plan" if name.startswith("plans/") else "index"
        damage(f"{kind} {name_to_id(name)[:16]}: {err}")
    # authoritative: the index objects a present plan replaces (a bare `supersedes` claim in an
    # index object is not enough: prune stores its index before its plan, and claims can be
    # forged). Their packs are condemned unless another index object lists them.
    superseded = state.superseded
    listings: dict[str, list[tuple[str, IndexedPack]]] = {}  # pack id -> every listing
    live: set[str] = set()  # packs listed by an index object that is not superseded
    holders: dict[bytes, set[str]] = {}  # blob id -> every pack said to hold it
    for iid, idx in sorted(files.items()):
        for p in idx.packs:
            pid = p.pack_id.hex()
            listings.setdefault(pid, []).append((iid, p))
            if iid not in superseded:
                live.add(pid)
            for b in p.blobs:
                holders.setdefault(b.id, set()).add(pid)
    events(Event("info", f"{len(files)} index objects, {len(live)} packs indexed"))

    # 2. live packs present; every present pack with the size its index objects give
    present = {name_to_id(i.name): i.size for i in repo.backend.list("data/")}
    for pid in sorted(live - set(present)):
        damage(f"pack {pid[:16]} is indexed but missing from storage")
    for pid, lst in sorted(listings.items()):
        if pid in present:
            for iid, p in lst:
                if p.size != present[pid]:
                    damage(
                        f"pack {pid[:16]} has size {present[pid]}, index {iid[:16]} says {p.size}"
                    )
    res.packs = len(present)

    # 3. snapshots and trees: every tree readable, every referenced blob in a pack in storage
    snapshots: list[Snapshot] = []
    for sid in repo.list_ids("snapshots/"):
        try:
            snapshots.append(repo.load_snapshot(sid))
        except NotFound:
            continue  # forgotten since it was listed
        except SafeholdError as e:
            damage(f"snapshot {sid[:8]}: {e}")
    res.snapshots = len(snapshots)

    live_present = live & set(present)
    used_condemned: set[str] = set()  # present packs only superseded index objects list, in use
    verdicts: dict[bytes, bool] = {}

    def held(blob: bytes) -> bool:
        """Whether a pack in storage holds the blob (by the index objects); notes the condemned
        packs that hold it when no live pack in storage does."""
        got = verdicts.get(blob)
        if got is None:
            packs = holders.get(blob, set())
            got = bool(packs & live_present)
            if not got:
                old = packs & set(present)
                used_condemned.update(old)
                got = bool(old)
            verdicts[blob] = got
        return got

    seen_trees: set[bytes] = set()
    reported: set[bytes] = set()
    for snap in snapshots:
        stack: list[tuple[bytes, str]] = [(snap.tree, "")]
        while stack:
            tid, path = stack.pop()
            if tid in seen_trees:
                continue
            seen_trees.add(tid)
            if not held(tid):
                damage(f"snapshot {snap.id[:8]}: tree of {path or '/'} is lost")
                continue
            try:
                nodes = repo.read_tree(tid)
            except SafeholdError as e:
                damage(f"snapshot {snap.id[:8]}: tree of {path or '/'} is unreadable: {e}")
                continue
            for n in nodes:
                npath = f"{path}/{os.fsdecode(n.name)}"
                if n.type == "dir" and n.subtree is not None:
                    stack.append((n.subtree, npath))
                for c in n.content or []:
                    if not held(c) and c not in reported:
                        reported.add(c)
                        damage(f"snapshot {snap.id[:8]}: {npath}: data blob {c.hex()[:16]} is lost")
    res.trees = len(seen_trees)

    unindexed = set(present) - live
    doomed = {c.hex() for p in plans.values() for c in p.condemned} | set(listings)
    if used_condemned:
        res.notes.append(
            f"{len(used_condemned)} packs are condemned by prune but still used by newer "
            "snapshots; the next prune keeps them"
        )
    waiting = (unindexed & doomed) - used_condemned
    if waiting:
        res.notes.append(f"{len(waiting)} packs are condemned by prune and wait for deletion")
    if unindexed - doomed:
        res.notes.append(
            f"{len(unindexed - doomed)} packs are not indexed (left by an interrupted backup; "
            "prune removes them)"
        )

    # 4. data: download, decrypt and verify every blob of the selected packs, and compare every
    # index entry for them with the pack's own header
    bad_blobs: set[bytes] = set()
    if opts.read_data or opts.subset:
        candidates = {p: present[p] for p in live_present | used_condemned}
        repo_id = repo.config.repo_id.hex()
        cycle, done = _load_state(opts.state_file, repo_id)
        done &= set(candidates)
        if opts.subset:
            todo = Subset.parse(opts.subset).choose(candidates, done)
        else:
            todo = sorted(candidates)

        def read_pack(pid: str) -> None:
            lst = listings.get(pid, [])
            try:
                bad, mismatches = _verify_pack(repo, pid, candidates[pid], lst)
            except (BackendError, NotFound) as e:
                damage(f"pack {pid[:16]}: cannot read: {e}")
                bad, mismatches = [b.id for _, p in lst for b in p.blobs], []
            except IntegrityError as e:
                damage(f"pack {pid[:16]}: {e}")
                bad, mismatches = [b.id for _, p in lst for b in p.blobs], []
            for msg in mismatches:
                damage(msg)
            with lock:
                res.packs_read += 1
                res.bytes_read += candidates[pid]
                bad_blobs.update(bad)
            events(Event("progress", data={"packs_done": res.packs_read, "packs_total": len(todo)}))

        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            list(pool.map(read_pack, todo))
        done |= set(todo)
        res.coverage = len(done) / len(candidates) if candidates else 1.0
        res.cycle = cycle
        if done >= set(candidates):  # every pack read in this cycle: the next run starts anew
            res.cycle_complete = True
            cycle, done = cycle + 1, set()
        _save_state(opts.state_file, repo_id, cycle, done)
        if bad_blobs:
            _name_damaged_files(repo, snapshots, bad_blobs, res)
    return res


SEGMENT = 8 << 20
"""Packs are verified in sequential reads of about this size: a few requests per pack on remote
storage, and a bounded amount of memory."""


def _compare_listings(
    pid: str,
    header: list[PackEntry],
    sealed_key: bytes,
    listings: list[tuple[str, IndexedPack]],
) -> tuple[list[str], list[PackEntry]]:
    """Index entries against the pack's own header: every index entry for the pack must be the
    header's entry for that blob id (type, offset, length, raw length, codec), and the sealed key
    the pack's. Returns the messages, and the index entries that do not match."""
    by_id: dict[bytes, list[PackEntry]] = {}
    for h in header:
        by_id.setdefault(h.id, []).append(h)
    msgs: list[str] = []
    wrong: list[PackEntry] = []
    for iid, p in listings:
        if p.sealed_key != sealed_key:
            msgs.append(
                f"index {iid[:16]}: the key it gives for pack {pid[:16]} is not the pack's own "
                "(forged or corrupt index)"
            )
        for e in p.blobs:
            found = by_id.get(e.id)
            if found is not None and e in found:
                continue
            if found is None:
                why = "the header has no blob with that id"
            else:
                h = found[0]
                why = (
                    f"index: type {e.type}, offset {e.offset}, length {e.length}, raw length "
                    f"{e.raw_length}, codec {e.codec}; header: type {h.type}, offset {h.offset}, "
                    f"length {h.length}, raw length {h.raw_length}, codec {h.codec}"
                )
            msgs.append(
                f"index {iid[:16]}: entry for blob {e.id.hex()[:16]} in pack {pid[:16]} does not "
                f"match the pack's header (forged or corrupt index): {why}"
            )
            wrong.append(e)
    return msgs, wrong


def _verify_pack(
    repo: Repository,
    pid: str,
    size: int,
    listings: list[tuple[str, IndexedPack]] | None = None,
) -> tuple[list[bytes], list[str]]:
    """Read a pack from end to end; returns the ids of blobs that fail, and what is wrong with
    the index entries for the pack (``listings``: each index object's entry for it). A blob
    whose index entry is wrong fails if the master index reads it from that entry. Raises if
    the pack is unreadable as a whole (truncated, trailer or header damaged, or it does not
    match its id)."""
    if repo.secrets.private_key is None:
        raise UsageError("check --read-data needs a full key")
    name = pack_name(pid)
    if size < PACK_PREFIX_LEN + TRAILER.size:
        raise IntegrityError("is truncated")
    prefix = repo.backend.load(name, 0, PACK_PREFIX_LEN)
    trailer = repo.backend.load(name, size - TRAILER.size, TRAILER.size)
    hdr_off, hdr_len = parse_trailer(trailer, size)
    header = repo.backend.load(name, hdr_off, hdr_len)
    if len(prefix) != PACK_PREFIX_LEN or len(header) != hdr_len:
        raise IntegrityError("is shorter than it should be")
    hasher = storage_hasher()
    hasher.update(prefix)
    bad: list[bytes] = []
    try:
        aead = crypto.Aead(crypto.unseal_key(repo.secrets.private_key, prefix[4:PACK_PREFIX_LEN]))
        entries = header_from_bytes(aead.decrypt(HEADER_NONCE, header))
        check_entries(entries, hdr_off)
    except (IntegrityError, FormatError):
        entries = None
    pack_id = bytes.fromhex(pid)
    pos = PACK_PREFIX_LEN
    todo = sorted(entries or [], key=lambda e: e.offset)
    i = 0
    while pos < hdr_off:
        # one read: whole blobs up to about SEGMENT bytes (at least one blob), gaps included
        j, end = i, pos
        while j < len(todo) and (j == i or todo[j].offset + todo[j].length - pos <= SEGMENT):
            end = todo[j].offset + todo[j].length
            j += 1
        if j == i:  # no blob left: the rest up to the header, SEGMENT at a time
            end = min(pos + SEGMENT, hdr_off)
        data = repo.backend.load(name, pos, end - pos)
        if len(data) != end - pos:
            raise IntegrityError("is shorter than it should be")
        hasher.update(data)
        view = memoryview(data)
        for e in todo[i:j]:
            try:
                repo.decode_blob(pack_id, e, view[e.offset - pos : e.offset - pos + e.length])
            except IntegrityError:
                bad.append(e.id)
        i, pos = j, end
    hasher.update(header)
    hasher.update(trailer)
    if entries is None:
        raise IntegrityError("its header cannot be read (damaged)")
    if hasher.hexdigest() != pid and not bad:
        raise IntegrityError("does not match its id, though every blob decrypts")
    msgs, wrong = _compare_listings(pid, entries, prefix[4:PACK_PREFIX_LEN], listings or [])
    index = repo.index
    for e in wrong:
        loc = index.lookup(e.id)
        if loc is not None and loc.pack_id == pack_id and loc.entry == e:
            bad.append(e.id)  # reads of this blob go by the wrong entry
    return bad, msgs


def _name_damaged_files(
    repo: Repository,
    snapshots: list[Snapshot],
    bad: set[bytes],
    res: CheckResult,
) -> None:
    for snap in snapshots:
        stack: list[tuple[bytes, str]] = [(snap.tree, "")]
        while stack:
            tid, path = stack.pop()
            if tid in bad:
                res.errors.append(f"snapshot {snap.id[:8]}: tree {path or '/'} is damaged")
                continue
            try:
                nodes = repo.read_tree(tid)
            except SafeholdError:
                continue
            for n in nodes:
                npath = f"{path}/{os.fsdecode(n.name)}"
                if n.subtree is not None:
                    stack.append((n.subtree, npath))
                if n.content and any(c in bad for c in n.content):
                    msg = f"snapshot {snap.id[:8]}: file {npath} is damaged"
                    res.errors.append(msg)
                    res.damaged_files.append(npath)
