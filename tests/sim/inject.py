"""Bugs put back on purpose (test-only code): the schedule explorer must find each of them.

* ``listing-race``: prune's deletion as safehold 0.1 did it. A pack counts as in use only if an
  index object that appeared *after the plan's listing* lists it, and a new snapshot's blob is
  rescued only if the live index lacks it; an index object written between prune's index load
  and its listing is trusted as known, so the pack it lists is deleted (issue 7, item 1).
* ``suspend-clock``: the lease is aged with a clock that stops while the machine is suspended
  (``CLOCK_MONOTONIC``), so a backup that slept through its lease never notices and commits into
  packs that prune deleted meanwhile.
* ``trust-plan``: deletion carries out the plan's condemned list as it stands, without deriving
  again from the index objects and snapshots present.
* ``copy-no-lease``: copy stores its snapshot without checking that its lock's lease still
  holds, so a copy that slept through its lease commits into packs prune deleted meanwhile.
* ``index-no-lease``: writers store index objects without a lease (as before the explorer found
  seed 369): an index object stored after the lease lapsed lists a pack prune then deletes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from safehold.errors import BackendError, NotFound
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.plan import PlanFile
from safehold.ids import index_name, pack_name, plan_name
from safehold.ops import copy as copy_mod
from safehold.ops import prune as prune_mod
from safehold.repository import locks as locks_mod
from safehold.repository import writer as writer_mod
from safehold.repository.repo import Repository

INJECTIONS = ("listing-race", "suspend-clock", "trust-plan", "copy-no-lease")
"""Each must be found within the explorer test's budget. ``index-no-lease`` is rarer (found after
1,839 schedules in one world): run it by hand with ``python bench/explore.py --inject``."""


def _finish_v01(repo: Repository, plan_id: str, plan: PlanFile, res: Any, events: Any) -> None:
    """safehold 0.1's deletion step, as it was."""
    condemned = {c.hex() for c in plan.condemned}
    index = repo.reload_index()
    known = {i.hex() for i in plan.indexes}
    for iid in repo.list_ids("index/"):
        if iid not in known:
            for p in repo.read_index_file(iid, use_cache=False).packs:
                condemned.discard(p.pack_id.hex())
    known_snaps = {s.hex() for s in plan.snapshots}
    new_snaps = [s for s in repo.snapshots() if s.id not in known_snaps]
    rescue: dict[bytes, IndexedPack] = {}
    if new_snaps:
        in_condemned: dict[bytes, IndexedPack] = {}
        for pid in sorted(condemned):
            try:
                pack = repo.read_pack_index(pid)
            except NotFound:
                continue
            index.add_pack(pack, live=False)
            for e in pack.blobs:
                in_condemned.setdefault(e.id, pack)
        for blob in prune_mod.referenced_blobs(repo, new_snaps):
            if not index.is_live(blob) and blob in in_condemned:
                rescue[in_condemned[blob].pack_id] = in_condemned[blob]
    if rescue:
        repo.store_index(IndexFile(list(rescue.values())))
        for rescued in rescue:
            condemned.discard(rescued.hex())
    _delete_all(repo, plan_id, plan, condemned, res)


def _finish_trusting(repo: Repository, plan_id: str, plan: PlanFile, res: Any, events: Any) -> None:
    _delete_all(repo, plan_id, plan, {c.hex() for c in plan.condemned}, res)


def _delete_all(
    repo: Repository, plan_id: str, plan: PlanFile, condemned: set[str], res: Any
) -> None:
    for pid in sorted(condemned):
        with contextlib.suppress(NotFound, BackendError):
            repo.backend.delete(pack_name(pid))
            res.deleted_packs += 1
    for old in plan.superseded:
        with contextlib.suppress(NotFound, BackendError):
            repo.backend.delete(index_name(old.hex()))
    with contextlib.suppress(NotFound, BackendError):
        repo.backend.delete(plan_name(plan_id))
    res.plans_finished.append(plan_id)


@contextlib.contextmanager
def injected(name: str) -> Iterator[None]:
    """Put the bug ``name`` back for the duration (none for "")."""
    if not name:
        yield
        return
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if name == "listing-race":
        patch(prune_mod, "_finish", _finish_v01)
    elif name == "trust-plan":
        patch(prune_mod, "_finish", _finish_trusting)
    elif name == "suspend-clock":
        lock_cls = locks_mod.RepositoryLock
        write = lock_cls._write

        def _write(self: Any) -> None:
            write(self)
            self._mono = self.clock.monotonic()

        def age(self: Any) -> float:
            return float(self.clock.monotonic() - getattr(self, "_mono", 0.0))

        patch(lock_cls, "_write", _write)
        patch(lock_cls, "age", age)
    elif name == "copy-no-lease":

        def commit(repo: Repository, snap: Any, lock: Any) -> None:
            repo.save_snapshot(snap)

        patch(copy_mod, "commit_snapshot", commit)
    elif name == "index-no-lease":
        init = writer_mod.WriteSession.__init__

        def unguarded(self: Any, *args: Any, **kw: Any) -> None:
            kw.pop("lock", None)
            init(self, *args, **kw)

        patch(writer_mod.WriteSession, "__init__", unguarded)
    else:
        raise ValueError(f"unknown injection {name!r}")
    try:
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
