"""Check: the repository's structure and, optionally, every byte of its data.

Check never trusts the local cache: it reads the config's state, the key files, index objects,
snapshots and trees from storage. Damage is reported with the snapshots and file paths it
affects, and the blob copies found bad are recorded (``Repository.note_damaged``) so that the
next backup stores them again. Check only reads and waits for no lock: what a prune finishing
meanwhile deletes is told from damage by listing storage and the index again.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from safehold import crypto
from safehold.errors import (
    BackendError,
    FormatError,
    IntegrityError,
    Interrupted,
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
from safehold.format.tree import Node
from safehold.ids import is_hex_id, name_to_id, pack_name, snapshot_name, storage_hasher, storage_id
from safehold.ops.walk import check_expansion
from safehold.repository.index import IndexState
from safehold.repository.keys import verify_key_file
from safehold.repository.locks import list_locks
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
    recorded: int = 0  # damaged blob copies recorded for the next backup to store again

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
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        text = json.dumps({"repo": repo_id, "cycle": cycle, "read": sorted(read)}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private, as the cache
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        pass  # the coverage state is a convenience: losing it restarts the cycle


MAX_REFRESHES = 4
"""How often one run of check lists storage and the index again (each time something looked
missing that a prune finishing meanwhile could explain)."""

COUNT_CAP = 1 << 62
"""Logical file and entry counts saturate here (a hostile tree DAG expands exponentially)."""


@dataclass
class _View:
    """What check knows of storage at one moment: the index objects and plans, and the packs."""

    state: IndexState
    present: dict[str, int]  # pack id -> size, as listed
    listings: dict[str, list[tuple[str, IndexedPack]]]  # pack id -> every index entry for it
    live: set[str]  # packs listed by an index object that no present plan supersedes
    holders: dict[bytes, set[str]]  # blob id -> every pack said to hold it


def _view(state: IndexState, present: dict[str, int]) -> _View:
    # authoritative: the index objects a present plan replaces (a bare `supersedes` claim in an
    # index object is not enough: prune stores its index before its plan, and claims can be
    # forged). Their packs are condemned unless another index object lists them.
    listings: dict[str, list[tuple[str, IndexedPack]]] = {}
    live: set[str] = set()
    holders: dict[bytes, set[str]] = {}
    for iid, idx in sorted(state.files.items()):
        for p in idx.packs:
            pid = p.pack_id.hex()
            listings.setdefault(pid, []).append((iid, p))
            if iid not in state.superseded:
                live.add(pid)
            for b in p.blobs:
                holders.setdefault(b.id, set()).add(pid)
    return _View(state, present, listings, live, holders)


def _summary_bounds(snap: Snapshot) -> tuple[int | None, int | None]:
    """The most regular files, and the most entries of any kind, that the snapshot's trees can
    honestly hold by its summary (None where the summary does not record it). A backup counts
    every regular file it meets as new, changed or unmodified (some are then left out: failed,
    excluded), every directory at least once and every other entry; the folders leading to the
    backed-up paths are not counted."""
    s = snap.summary

    def num(key: str) -> int | None:
        v = s.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    counted = [num(k) for k in ("files_new", "files_changed", "files_unmodified")]
    if any(v is None for v in counted):
        return None, None
    files = sum(v for v in counted if v is not None)
    dirs, others = num("dirs"), num("other_entries")
    if dirs is None or others is None:
        return files, None
    leading = sum(len([x for x in p.split("/") if x]) for p in snap.paths)
    return files, files + dirs + others + leading


def _count(n: int) -> str:
    return f"more than {COUNT_CAP}" if n >= COUNT_CAP else str(n)


class _Check:
    """One run of check. It takes no lock that could wait for another client: a prune may finish
    while it runs, so whatever looks missing is confirmed against a second listing of storage
    (and of the index) before it is called damage."""

    def __init__(
        self,
        repo: Repository,
        opts: CheckOptions,
        events: EventSink,
        stop: threading.Event | None = None,
    ) -> None:
        self.repo = repo
        self.opts = opts
        self.events = events
        self.stop = stop or threading.Event()
        self.res = CheckResult()
        self.lock = threading.Lock()
        self.refreshes = 0
        self.named: set[str] = set()  # unreadable objects and missing packs reported already
        self.verdicts: dict[bytes, bool] = {}
        self.used_condemned: set[str] = set()  # packs only superseded index objects list, in use
        self.gone: set[str] = set()  # packs a prune deleted while check ran
        self.missing: set[str] = set()  # packs confirmed missing (damage)
        self.view = _View(IndexState(), {}, {}, set(), {})
        self.known: dict[str, str] = {}  # id prefix of a repaired original -> its repaired copy

    # --- reporting --------------------------------------------------------------------------

    def damage(self, msg: str) -> None:
        # damage of a snapshot that ``repair snapshots`` has already repaired (its repaired copy
        # is present) is known and handled: a note, so that repair and the next backup make
        # check clean while the original stays, restoring all it can (and whole again if a
        # backup stores the lost data again)
        if msg.startswith("snapshot ") and msg[9:17] in self.known:
            self.note(
                f"{msg} (known: repaired as {self.known[msg[9:17]][:8]}; 'forget {msg[9:17]}' "
                "removes the original)"
            )
            return
        with self.lock:
            self.res.errors.append(msg)
        self.events(Event("damage", msg))

    def note(self, msg: str) -> None:
        with self.lock:
            self.res.notes.append(msg)

    def record(self, pack_id: str, blobs: Iterable[bytes], reason: str) -> None:
        """Record damaged copies so that readers avoid them and the next backup stores the blobs
        again (in the local cache at once, if the repository has one; in the repository by
        :meth:`run`'s ``save_damage`` at the end)."""
        blobs = list(blobs)
        if not blobs:
            return
        self.repo.note_damaged(bytes.fromhex(pack_id), blobs, reason)
        with self.lock:
            self.res.recorded += len(blobs)

    # --- what is in storage -----------------------------------------------------------------

    def list_packs(self) -> dict[str, int]:
        return {name_to_id(i.name): i.size for i in self.repo.backend.list("data/")}

    def load_state(self) -> IndexState:
        state = self.repo.reload_index(use_cache=False).state
        for name, err in sorted(state.unreadable.items()):
            if name not in self.named:
                self.named.add(name)
                kind = "plan" if name.startswith("plans/") else "index"
                self.damage(f"{kind} {name_to_id(name)[:16]}: {err}")
        return state

    def load(self) -> None:
        # plans, then index objects, read from storage (never the cache): the master index
        # loads them in that order; then the packs
        state = self.load_state()
        self.view = _view(state, self.list_packs())
        if self.view.live - set(self.view.present):
            self.refresh(force=True)
        self.events(
            Event("info", f"{len(state.files)} index objects, {len(self.view.live)} packs indexed")
        )

    def refresh(self, *, force: bool = False) -> bool:
        """List the packs, then read the plans and the index objects, then list the packs again.
        A pack that a live index object lists and that is in neither listing is missing: a prune
        deletes a pack only after storing a plan that supersedes its index objects, and deletes
        those objects before the plan, so a pack deleted before the first listing is seen as
        condemned or unlisted; a backup stores its packs before its index objects, so a pack
        indexed when the index is read is in the second listing. Returns whether it listed."""
        if self.refreshes >= MAX_REFRESHES and not force:
            return False
        self.refreshes += 1
        old = self.view
        first = self.list_packs()
        state = self.load_state()
        second = self.list_packs()
        self.view = new = _view(state, second)
        self.verdicts.clear()
        self.used_condemned &= set(second)
        missing = new.live - set(first) - set(second)
        self.gone |= (old.live | set(old.present)) - set(first) - set(second) - missing
        self.report_missing(missing)
        return True

    def report_missing(self, missing: set[str]) -> None:
        for pid in sorted(missing - self.missing):
            self.missing.add(pid)
            self.damage(f"pack {pid[:16]} is indexed but missing from storage")
            blobs = {b.id for _, p in self.view.listings.get(pid, []) for b in p.blobs}
            self.record(pid, sorted(blobs), f"pack {pid[:16]} is missing from storage")

    def held(self, blob: bytes) -> bool:
        """Whether a pack in storage holds the blob (by the index objects); notes the condemned
        packs that hold it when no live pack in storage does."""
        got = self.verdicts.get(blob)
        if got is None:
            v = self.view
            packs = v.holders.get(blob, set()) & v.present.keys()
            got = bool(packs & v.live)
            if not got:
                self.used_condemned.update(packs)
                got = bool(packs)
            self.verdicts[blob] = got
        return got

    def held_now(self, blob: bytes) -> bool:
        """:meth:`held`, asking storage again before saying no."""
        return self.held(blob) or (self.refresh() and self.held(blob))

    def pack_vanished(self, blob: bytes) -> bool:
        for loc in self.repo.index.locations(blob):
            try:
                self.repo.backend.stat(pack_name(loc.pack_id.hex()))
            except NotFound:
                return True
            except SafeholdError:
                continue
        return False

    # --- the parts of a check ---------------------------------------------------------------

    def check_config_and_keys(self) -> None:
        why = self.repo.config_damaged  # the config failed; the copy in a key file was used
        if why:
            self.damage(why if why.startswith("config") else f"config: {why}")
        for info in self.repo.backend.list("keys/"):
            kid = name_to_id(info.name)
            if not is_hex_id(kid):
                self.note(f"{info.name} is not a key file name (ignored)")
                continue
            try:
                data = self.repo.backend.load(info.name)
            except NotFound:
                continue  # removed since it was listed
            err = verify_key_file(info.name, data)
            if err:
                self.damage(f"key {kid[:16]}: {err}")

    def load_snapshots(self) -> list[Snapshot]:
        """Every snapshot object; one that cannot be read is named, and the others checked."""
        snapshots: list[Snapshot] = []
        for sid in self.repo.list_ids("snapshots/"):
            try:
                snapshots.append(self.repo.load_snapshot(sid))
            except NotFound:
                continue  # forgotten since it was listed
            except SafeholdError as e:
                self.damage(f"snapshot {sid[:8]}: {e}{self._copy_of(sid)}")
        self.res.snapshots = len(snapshots)
        ids = {s.id for s in snapshots}
        for s in snapshots:
            orig = s.summary.get("repaired_from")
            if isinstance(orig, str) and orig in ids and orig != s.id:
                self.known[orig[:8]] = s.id
        # originals with a repaired copy last: damage they share with another snapshot is
        # reported as that snapshot's
        snapshots.sort(key=lambda s: s.id[:8] in self.known)
        return snapshots

    def _copy_of(self, sid: str) -> str:
        """For an object not matching its name: whose content it holds, if that is present."""
        name = snapshot_name(sid)
        try:
            true = storage_id(self.repo.backend.load(name))
        except SafeholdError:
            return ""
        if true != sid and true in self.repo.list_ids("snapshots/"):
            return (
                f" (it is a copy of snapshot {true[:8]} under a wrong name: remove it with "
                f"'forget {sid[:12]}' or 'repair snapshots --forget-originals')"
            )
        return ""

    def read_tree(self, snap: Snapshot, tid: bytes, path: str) -> list[Node] | None:
        where = path or "/"
        if not self.held_now(tid):
            self.damage(f"snapshot {snap.id[:8]}: tree of {where} is lost")
            return None
        try:
            return self.repo.read_tree(tid)
        except SafeholdError as e:
            err = e
        if self.pack_vanished(tid) and self.refresh():  # deleted by a prune meanwhile?
            if not self.held(tid):
                self.damage(f"snapshot {snap.id[:8]}: tree of {where} is lost")
                return None
            try:
                return self.repo.read_tree(tid)
            except SafeholdError as e:
                err = e
        self.damage(f"snapshot {snap.id[:8]}: tree of {where} is unreadable: {err}")
        return None

    def walk(self, snapshots: list[Snapshot]) -> None:
        """Every tree readable (each read once), every referenced blob in a pack in storage, and
        no snapshot whose trees expand to more than its summary says was backed up."""
        counts: dict[bytes, tuple[int, int]] = {}  # tree -> (regular files, entries) below it
        shape: dict[bytes, tuple[int, tuple[bytes, ...]]] = {}  # tree -> own entries, subtrees
        reported: set[bytes] = set()
        for snap in snapshots:
            # iterative post-order: a tree is counted once all of its subtrees are
            expanding: set[bytes] = set()
            stack: list[tuple[bytes, str, list[Node] | None]] = [(snap.tree, "", None)]
            while stack:
                tid, path, nodes = stack[-1]
                if nodes is not None:
                    stack.pop()
                    expanding.discard(tid)
                    files = entries = 0
                    subs: dict[bytes, None] = {}
                    for n in nodes:
                        entries += 1
                        if n.type == "file":
                            files += 1
                        elif n.type == "dir" and n.subtree is not None:
                            subs[n.subtree] = None
                            f, e = counts.get(n.subtree, (0, 0))
                            files, entries = files + f, entries + e
                    counts[tid] = (min(files, COUNT_CAP), min(entries, COUNT_CAP))
                    shape[tid] = (len(nodes), tuple(subs))
                    continue
                if tid in counts:
                    stack.pop()
                    continue
                if tid in expanding:  # only a forged id could make a tree contain itself
                    stack.pop()
                    self.damage(f"snapshot {snap.id[:8]}: tree of {path or '/'} contains itself")
                    continue
                got = self.read_tree(snap, tid, path)
                if got is None:
                    stack.pop()
                    counts[tid] = (0, 0)
                    continue
                stack[-1] = (tid, path, got)
                expanding.add(tid)
                for n in got:
                    npath = f"{path}/{os.fsdecode(n.name)}"
                    if n.type == "dir" and n.subtree is not None and n.subtree not in counts:
                        stack.append((n.subtree, npath, None))
                    if n.type == "file":
                        self.check_size(snap, npath, n)
                    for c in n.content or []:
                        if c not in reported and not self.held_now(c):
                            reported.add(c)
                            self.damage(
                                f"snapshot {snap.id[:8]}: {npath}: data blob {c.hex()[:16]} is lost"
                            )
            self.compare_summary(snap, counts.get(snap.tree, (0, 0)))
            self.check_expansion(snap, counts.get(snap.tree, (0, 0))[1], shape)
        self.res.trees = len(counts)

    def check_expansion(
        self, snap: Snapshot, entries: int, shape: dict[bytes, tuple[int, tuple[bytes, ...]]]
    ) -> None:
        """A snapshot may not expand to more paths than :func:`~safehold.ops.walk.expansion_bound`
        of its distinct entries (a bound the summary, written with the key, cannot forge)."""

        def distinct() -> int:
            seen = {snap.tree}
            stack = [snap.tree]
            total = 0
            while stack:
                own, subs = shape.get(stack.pop(), (0, ()))
                total += own
                for c in subs:
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)
            return total

        try:
            check_expansion(entries, distinct)
        except IntegrityError as e:
            self.damage(f"snapshot {snap.id[:8]}: {e}")

    def check_size(self, snap: Snapshot, path: str, node: Node) -> None:
        """A file's recorded size is the sum of its blobs' raw lengths (a blob not in the
        index is reported as lost instead)."""
        held = 0
        for c in node.content or []:
            loc = self.repo.index.lookup(c)
            if loc is None:
                return
            held += loc.entry.raw_length
        if held != node.size:
            self.damage(
                f"snapshot {snap.id[:8]}: {path}: its size says {node.size}, "
                f"its content holds {held}"
            )

    def compare_summary(self, snap: Snapshot, got: tuple[int, int]) -> None:
        files, entries = got
        max_files, max_entries = _summary_bounds(snap)
        why = "its trees expand beyond what was backed up (forged or corrupt)"
        if max_files is not None and files > max_files:
            self.damage(
                f"snapshot {snap.id[:8]}: its trees hold {_count(files)} files, its summary "
                f"records {max_files}: {why}"
            )
        elif max_entries is not None and entries > max_entries:
            self.damage(
                f"snapshot {snap.id[:8]}: its trees hold {_count(entries)} entries, its summary "
                f"records at most {max_entries}: {why}"
            )

    def pack_notes(self) -> None:
        v = self.view
        unindexed = set(v.present) - v.live
        doomed = {c.hex() for p in v.state.plan_files.values() for c in p.condemned}
        doomed |= set(v.listings)
        used = self.used_condemned - v.live
        if used:
            self.note(
                f"{len(used)} packs are condemned by prune but still used by newer "
                "snapshots; the next prune keeps them"
            )
        waiting = (unindexed & doomed) - used
        if waiting:
            self.note(f"{len(waiting)} packs are condemned by prune and wait for deletion")
        if unindexed - doomed:
            ids = sorted(unindexed - doomed)
            shown = ", ".join(i[:16] for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            self.note(
                f"{len(ids)} packs are not indexed: {shown} (left by an interrupted backup, a "
                "repair or a copy under a wrong name; prune removes them)"
            )

    def read_data(self, snapshots: list[Snapshot]) -> None:
        """Download, decrypt and verify every blob of the selected packs, and compare every index
        entry for them with the pack's own header. Bad copies are recorded."""
        repo, opts, res = self.repo, self.opts, self.res
        v = self.view
        candidates = {p: v.present[p] for p in (v.live | self.used_condemned) if p in v.present}
        repo_id = repo.config.repo_id.hex()
        cycle, done = _load_state(opts.state_file, repo_id)
        done &= set(candidates)
        if opts.subset:
            todo = Subset.parse(opts.subset).choose(candidates, done)
        else:
            todo = sorted(candidates)
        bad: dict[str, dict[bytes, str]] = {}  # pack -> its blobs that fail -> why
        failed: set[str] = set()  # packs unreadable as a whole
        verified: set[str] = set()  # packs read end to end
        vanished: set[str] = set()

        def read_pack(pid: str) -> None:
            if self.stop.is_set():
                return
            lst = v.listings.get(pid, [])
            listed = {b.id: "" for _, p in lst for b in p.blobs}
            got: dict[bytes, str] = {}
            try:
                got, mismatches = _verify_pack(repo, pid, candidates[pid], lst)
            except NotFound:
                with self.lock:
                    vanished.add(pid)
                return
            except PackDamage as e:  # the pack is damaged; only failing blobs are recorded
                self.damage(f"pack {pid[:16]}: {e}")
                mismatches = []
                got = e.bad
                with self.lock:
                    verified.add(pid)
            except BackendError as e:  # not proof of damage: reported, not recorded
                self.damage(f"pack {pid[:16]}: cannot read: {e}")
                mismatches = []
                with self.lock:
                    failed.add(pid)
                    bad.setdefault(pid, {}).update(listed)
            except IntegrityError as e:
                self.damage(f"pack {pid[:16]}: {e}")
                mismatches = []
                why = f"pack {pid[:16]}: {e}"
                got = dict.fromkeys(listed, why)
                with self.lock:
                    failed.add(pid)
            else:
                with self.lock:
                    verified.add(pid)
            for msg in mismatches:
                self.damage(msg)
            with self.lock:
                if got:
                    bad.setdefault(pid, {}).update(got)
                res.packs_read += 1
                res.bytes_read += candidates[pid]
            self.events(
                Event("progress", data={"packs_done": res.packs_read, "packs_total": len(todo)})
            )

        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            list(pool.map(read_pack, todo))
        if self.stop.is_set():  # nothing recorded as read: the next run reads these again
            raise Interrupted("check stopped while reading data")
        if vanished:  # deleted by a prune meanwhile, or missing: storage is asked again
            self.refresh(force=True)
            for pid in sorted(vanished - self.missing):
                if pid in self.view.present:
                    self.damage(f"pack {pid[:16]}: cannot read: it is listed but not found")
                else:
                    self.gone.add(pid)
        for pid, blobs in sorted(bad.items()):
            by_why: dict[str, list[bytes]] = {}
            for b, why in sorted(blobs.items()):
                if why:  # "": the pack could not be read (storage failed): no proof of damage
                    by_why.setdefault(why, []).append(b)
            for why, ids in by_why.items():
                self.record(pid, ids, why)
        done |= set(todo) - vanished
        res.coverage = len(done) / len(candidates) if candidates else 1.0
        res.cycle = cycle
        if done >= set(candidates) - self.gone:  # every pack read in this cycle: start anew
            res.cycle_complete = True
            cycle, done = cycle + 1, set()
        _save_state(opts.state_file, repo_id, cycle, done)
        lines: list[str] = []  # one per lost blob copy
        lost = self.judge_copies(bad, failed, verified, candidates, lines.append)
        users: list[str] = []  # one per snapshot file or tree that uses a lost blob
        if lost:
            _name_damaged_files(repo, snapshots, lost, res, users.append)
        # a blob lost for good that only repaired originals use is known and handled (their
        # repaired copies do without it): a note, as the originals' files are
        known = bool(users) and all(
            u.startswith("snapshot ") and u[9:17] in self.known for u in users
        )
        for line in lines:
            if known:
                self.note(f"{line} (only repaired originals use it)")
            else:
                self.damage(line)
        for u in users:
            self.damage(u)

    def judge_copies(
        self,
        bad: dict[str, dict[bytes, str]],
        failed: set[str],
        verified: set[str],
        candidates: dict[str, int],
        report: Callable[[str], None],
    ) -> set[bytes]:
        """The blobs with no good copy (each ``report``-ed); a bad copy of a blob that has a
        good one elsewhere is a note (the next prune drops it), not data loss."""
        index = self.repo.index
        lost: set[bytes] = set()
        for pid, blobs in sorted(bad.items()):
            for b in sorted(blobs):
                others = {
                    q
                    for q in self.view.holders.get(b, set())
                    if q != pid and q in candidates and q not in failed and b not in bad.get(q, {})
                }
                good = bool(others & verified) or bool(others - verified and index.usable(b))
                if good:
                    self.note(
                        f"pack {pid[:16]}: blob {b.hex()[:16]}: damaged copy, another copy is "
                        "good; prune will drop it"
                    )
                else:
                    lost.add(b)
                    if pid not in failed:  # a pack that failed whole was named already
                        why = blobs[b] or "cannot be read"
                        report(f"pack {pid[:16]}: blob {b.hex()[:16]} is damaged: {why}")
        return lost

    def run(self) -> CheckResult:
        self.check_config_and_keys()
        self.note_exclusive_locks()
        self.load()
        for pid, lst in sorted(self.view.listings.items()):
            if pid in self.view.present:
                for iid, p in lst:
                    if p.size != self.view.present[pid]:
                        self.damage(
                            f"pack {pid[:16]} has size {self.view.present[pid]}, index "
                            f"{iid[:16]} says {p.size}"
                        )
        snapshots = self.load_snapshots()
        self.walk(snapshots)
        if self.opts.read_data or self.opts.subset:
            self.read_data(snapshots)
        self.res.packs = len(self.view.present)
        self.pack_notes()
        if self.gone:
            self.note(
                f"{len(self.gone)} packs were deleted by a prune while check ran (not damage; "
                "the data they held that snapshots use is in other packs)"
            )
        self.repo.save_damage()  # every client learns it (full keys; else the cache keeps it)
        return self.res

    def note_exclusive_locks(self) -> None:
        try:
            held = [lk for lk in list_locks(self.repo.backend) if lk.exclusive and not lk.stale()]
        except SafeholdError:
            return
        for lk in held:
            self.note(
                f"{lk.describe()} is held: the repository may change while check runs "
                "(run check again once it is gone)"
            )


def check(
    repo: Repository,
    opts: CheckOptions | None = None,
    *,
    events: EventSink = ignore_events,
    stop: threading.Event | None = None,
) -> CheckResult:
    """Check the repository; see the module's docstring. Takes no lock: the CLI holds a reader
    lock (:func:`safehold.repository.locks.reader_lock`), which no other lock refuses. Setting
    ``stop`` ends a ``read_data`` check between packs (Interrupted)."""
    return _Check(repo, opts or CheckOptions(), events, stop).run()


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


class PackDamage(IntegrityError):
    """A pack damaged outside its blobs: ``bad`` holds only the blobs that fail themselves."""

    def __init__(self, message: str, bad: dict[bytes, str]) -> None:
        super().__init__(message)
        self.bad = bad


def _listed_entries(listings: list[tuple[str, IndexedPack]], limit: int) -> list[PackEntry]:
    """The blob entries the index objects give for a pack, within its blob area (one per
    offset)."""
    seen: dict[int, PackEntry] = {}
    for _, p in listings:
        for e in p.blobs:
            if e.offset >= PACK_PREFIX_LEN and e.offset + e.length <= limit:
                seen.setdefault(e.offset, e)
    return list(seen.values())


def _verify_pack(
    repo: Repository,
    pid: str,
    size: int,
    listings: list[tuple[str, IndexedPack]] | None = None,
) -> tuple[dict[bytes, str], list[str]]:
    """Read a pack from end to end; returns the ids of blobs that fail (with why), and what is
    wrong with the index entries for the pack (``listings``: each index object's entry for it).
    A blob whose index entry is wrong fails if the master index reads it from that entry. Raises if
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
    bad: dict[bytes, str] = {}
    try:
        aead = crypto.Aead(crypto.unseal_key(repo.secrets.private_key, prefix[4:PACK_PREFIX_LEN]))
        entries = header_from_bytes(aead.decrypt(HEADER_NONCE, header))
        check_entries(entries, hdr_off)
    except (IntegrityError, FormatError):
        entries = None
    pack_id = bytes.fromhex(pid)
    pos = PACK_PREFIX_LEN
    # a header that cannot be read: the blobs are verified by what the index says of them
    listed = entries if entries is not None else _listed_entries(listings or [], hdr_off)
    todo = sorted(listed, key=lambda e: e.offset)
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
            except IntegrityError as err:
                bad[e.id] = str(err)
        i, pos = j, end
    hasher.update(header)
    hasher.update(trailer)
    if entries is None:
        if not todo:
            raise IntegrityError("its header cannot be read (damaged)")
        raise PackDamage(
            f"its header cannot be read (damaged); {len(todo) - len(bad)} of {len(todo)} blobs "
            "verify by the index's entries ('repair index' copies them into a healthy pack)",
            bad,
        )
    if hasher.hexdigest() != pid and not bad:
        # damage outside the blobs (magic, sealed key copy, header): every blob is what it
        # should be, so none is recorded as damaged
        raise PackDamage(
            "does not match its id, though every blob verifies ('repair index' copies them "
            "into a healthy pack)",
            bad,
        )
    msgs, wrong = _compare_listings(pid, entries, prefix[4:PACK_PREFIX_LEN], listings or [])
    index = repo.index
    for e in wrong:
        loc = index.lookup(e.id)
        if loc is not None and loc.pack_id == pack_id and loc.entry == e:
            # reads of this blob go by the wrong entry
            bad.setdefault(e.id, f"the index entry for blob {e.id.hex()[:16]} is wrong")
    return bad, msgs


def _name_damaged_files(
    repo: Repository,
    snapshots: list[Snapshot],
    bad: set[bytes],
    res: CheckResult,
    damage: Callable[[str], None],
) -> None:
    """Name the files and trees of each snapshot that use a bad blob. Each tree is read once per
    snapshot (a file in a subtree the snapshot uses twice is named under its first path)."""
    for snap in snapshots:
        seen: set[bytes] = set()
        stack: list[tuple[bytes, str]] = [(snap.tree, "")]
        while stack:
            tid, path = stack.pop()
            if tid in seen:
                continue
            seen.add(tid)
            if tid in bad:
                damage(f"snapshot {snap.id[:8]}: tree {path or '/'} is damaged")
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
                    damage(f"snapshot {snap.id[:8]}: file {npath} is damaged")
                    res.damaged_files.append(npath)
