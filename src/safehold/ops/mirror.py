"""Mirror a repository's stored objects to another location, as they are (already encrypted).

No key is needed: objects are copied byte for byte. Each object named by the hash of its content
(packs, index objects, snapshots, plans, keys) is checked against its name before it is stored,
so damage in the source is never spread; every object stored is checked afterwards by its size
at the target. An object present at the target with the same size is skipped, so a second
mirror transfers nothing.

The order keeps a partial mirror a consistent repository (docs/format.md §1.1, §11): packs,
then index objects and prune plans, then key files and the config, and snapshots last, so a
snapshot never arrives before the data it refers to. With ``delete``, objects the source no
longer has are deleted at the target only after everything else is copied (snapshots first,
packs after the index objects that list them), and only if nothing failed; without it nothing
is ever deleted. Locks and temporaries are never mirrored. A pack the source lacks but its
index still lists (given as ``keep``) was lost, not pruned, and is never deleted. An object at
the target whose content does not match its name (damaged there) is replaced when its size
differs, or with ``verify`` in any case.

The source is read under a reader lock (a prune of the source waits for the mirror); the target
is written under an exclusive lock with ``op`` "mirror", so that two mirrors never interleave.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safehold.backends.base import Backend, ObjectInfo
from safehold.errors import AlreadyExists, Interrupted, NotFound, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.ids import CONFIG_NAME, is_hex_id, name_to_id, storage_id
from safehold.repository.locks import RepositoryLock, reader_lock

GROUPS: tuple[tuple[str, ...], ...] = (
    ("data/",),
    ("index/", "plans/"),
    ("keys/",),
    (CONFIG_NAME,),
    ("snapshots/",),
)
"""What is copied, in this order (each group completes before the next starts)."""
LIST_ORDER: tuple[str, ...] = ("snapshots/", CONFIG_NAME, "keys/", "plans/", "index/", "data/")
"""The order in which the source is listed (the reverse of the order of its writes)."""
DELETE_ORDER: tuple[str, ...] = ("snapshots/", "data/", "index/", "plans/", "keys/")
"""With ``delete``: the prefixes whose extra objects are deleted, in this order."""


@dataclass
class MirrorOptions:
    delete: bool = False  # delete at the target what the source no longer has
    workers: int = 4  # objects copied at once (0 or 1: one at a time)
    keep: Callable[[str], bool] | None = None
    """With ``delete``: names never to delete although the source lacks them (the packs the
    source's index still lists: one missing from the source was lost, not pruned, and the
    mirror's copy may be the only one left)."""
    verify: bool = False  # read back the objects already at the target; replace damaged ones


@dataclass
class MirrorResult:
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0
    bytes_skipped: int = 0
    deleted: int = 0
    bytes_deleted: int = 0
    repaired: int = 0  # objects at the target whose content did not match: replaced
    kept: list[str] = field(default_factory=list)  # not deleted: still listed by the source
    failed: dict[str, str] = field(default_factory=dict)  # name -> why (nothing else is wrong)
    ignored: list[str] = field(default_factory=list)  # source names that are not objects

    def as_dict(self) -> dict[str, Any]:
        return {
            "copied": self.copied,
            "bytes_copied": self.bytes_copied,
            "skipped": self.skipped,
            "bytes_skipped": self.bytes_skipped,
            "deleted": self.deleted,
            "bytes_deleted": self.bytes_deleted,
            "repaired": self.repaired,
            "kept": self.kept,
            "failed": [{"name": n, "error": why} for n, why in sorted(self.failed.items())],
            "ignored": self.ignored,
        }


def mirrored_name(name: str) -> bool:
    """Whether ``name`` is an object a mirror copies: the config, or a key file, pack, index
    object, plan or snapshot under its id (never a lock or a temporary)."""
    if name == CONFIG_NAME:
        return True
    parts = name.split("/")
    oid = parts[-1]
    if not is_hex_id(oid):
        return False
    if parts[0] == "data":
        return len(parts) == 3 and parts[1] == oid[:2]
    return len(parts) == 2 and parts[0] in ("keys", "index", "plans", "snapshots")


def _nested(a: str, b: str) -> bool:
    """Whether two local locations lie one inside the other."""
    if not (os.path.isabs(a) and os.path.isabs(b)):
        return False
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or rb.startswith(ra.rstrip("/") + "/") or ra.startswith(rb.rstrip("/") + "/")


def _listing(backend: Backend, prefix: str) -> dict[str, int]:
    if prefix == CONFIG_NAME:
        try:
            return {CONFIG_NAME: backend.stat(CONFIG_NAME).size}
        except NotFound:
            return {}
    return {i.name: i.size for i in backend.list(prefix)}


def mirror(
    src: Backend,
    dst: Backend,
    opts: MirrorOptions | None = None,
    *,
    events: EventSink = ignore_events,
    stop: threading.Event | None = None,
) -> MirrorResult:
    """Copy the repository at ``src`` to ``dst`` object by object (see the module's doc).

    Raises UsageError when ``src`` holds no repository or ``dst`` holds another one, Interrupted
    when ``stop`` is set (what was copied stays; the next run skips it). Objects that fail
    verification are named in ``failed``; the others are copied all the same. Reports ``info``
    events (one per object copied or deleted) and ``progress`` events."""
    opts = opts or MirrorOptions()
    stop = stop or threading.Event()
    try:
        src_config = src.load(CONFIG_NAME)
    except NotFound:
        raise UsageError(f"there is no repository at {src.location}") from None
    if src.location == dst.location:
        raise UsageError("the mirror's target is the repository itself")
    if _nested(src.location, dst.location):
        raise UsageError(
            f"the mirror's target {dst.location} and the repository {src.location} lie one "
            "inside the other: choose a target outside the repository"
        )
    try:
        dst_config: bytes | None = dst.load(CONFIG_NAME)
    except NotFound:
        dst_config = None
    if dst_config is not None and dst_config != src_config:
        raise UsageError(
            f"{dst.location} holds another repository (its config differs): refusing to mirror "
            "into it"
        )
    if dst_config is None:
        dst.create()
    rlock = reader_lock(src)
    try:
        held = RepositoryLock(dst, exclusive=True, op="mirror")
        held.acquire()
        try:
            return _Mirror(src, dst, opts, events, stop).run()
        finally:
            held.release()
    finally:
        if rlock is not None:
            rlock.release()


class _Mirror:
    def __init__(
        self,
        src: Backend,
        dst: Backend,
        opts: MirrorOptions,
        events: EventSink,
        stop: threading.Event,
    ) -> None:
        self.src = src
        self.dst = dst
        self.opts = opts
        self.events = events
        self.stop = stop
        self.res = MirrorResult()
        self.lock = threading.Lock()

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted: what was mirrored stays, the next run goes on")

    def run(self) -> MirrorResult:
        res = self.res
        # the source is listed in the reverse order of its writes (snapshots before the index
        # objects they need, index objects before their packs), so that every object a listed
        # one refers to is listed too, whatever is written meanwhile (docs/format.md §15.2)
        listed: dict[str, dict[str, int]] = {}
        for prefix in LIST_ORDER:
            self.check_stop()
            listed[prefix] = _listing(self.src, prefix)
        wanted: set[str] = set()
        for group in GROUPS:
            todo: list[ObjectInfo] = []
            for prefix in group:
                self.check_stop()
                there = _listing(self.dst, prefix)
                for name, size in sorted(listed[prefix].items()):
                    if not mirrored_name(name):
                        if not name.rsplit("/", 1)[-1].startswith(".tmp-"):
                            res.ignored.append(name)
                        continue
                    wanted.add(name)
                    if there.get(name) == size and not (
                        self.opts.verify and self._damaged_at_target(name)
                    ):
                        res.skipped += 1
                        res.bytes_skipped += size
                    else:
                        todo.append(ObjectInfo(name, size))
            self._copy_all(todo)
            self.check_stop()
            self.events(Event("progress", data=self.res.as_dict()))
        for name in res.ignored:
            self.events(Event("warning", f"{name} is not a repository object: not mirrored"))
        if self.opts.delete:
            if res.failed:
                self.events(
                    Event("warning", "nothing was deleted at the target: some objects failed")
                )
            else:
                self._delete_extra(wanted)
        return res

    def _copy_all(self, todo: list[ObjectInfo]) -> None:
        if self.opts.workers <= 1 or len(todo) <= 1:
            for info in todo:
                self.check_stop()
                self._copy_one(info)
            return
        with ThreadPoolExecutor(self.opts.workers, thread_name_prefix="safehold-mirror") as pool:
            limit = threading.BoundedSemaphore(self.opts.workers * 2)
            futures: list[Future[None]] = []
            try:
                for info in todo:
                    self.check_stop()
                    limit.acquire()
                    fut = pool.submit(self._copy_one, info)
                    fut.add_done_callback(lambda _f: limit.release())
                    futures.append(fut)
                    for done in [f for f in futures if f.done()]:
                        done.result()  # a storage error stops the mirror
                        futures.remove(done)
                for f in futures:
                    f.result()
            except BaseException:
                self.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _fail(self, name: str, why: str) -> None:
        with self.lock:
            self.res.failed[name] = why
        self.events(Event("warning", f"{name} not mirrored: {why}"))

    def _copy_one(self, info: ObjectInfo) -> None:
        if self.stop.is_set():
            return
        name = info.name
        try:
            data = self.src.load(name)
        except NotFound:
            return  # deleted since it was listed (a prune of the source): nothing to copy
        if len(data) != info.size:
            # rewritten since it was listed (only locks are), or a short read
            self._fail(name, f"read {len(data)} bytes of {info.size}")
            return
        if name != CONFIG_NAME and storage_id(data) != name_to_id(name):
            self._fail(name, "its content does not match its name in the source (damaged)")
            return
        repaired = False
        try:
            self.dst.store(name, data)
        except AlreadyExists:
            if name == CONFIG_NAME:
                self._fail(name, "the target holds another config; left as it is")
                return
            # the name is the hash of the content, and the source's content was verified
            # against it: what the target holds under it is damaged, and is replaced
            self.dst.store(name, data, overwrite=True)
            repaired = True
        got = self.dst.stat(name).size
        if got != len(data):
            self._fail(name, f"the target holds {got} bytes after storing {len(data)}")
            return
        with self.lock:
            self.res.copied += 1
            self.res.bytes_copied += len(data)
            self.res.repaired += repaired
        what = "replaced the damaged copy of" if repaired else "copied"
        self.events(Event("info", f"{what} {name}", {"name": name, "size": len(data)}))

    def _damaged_at_target(self, name: str) -> bool:
        """Whether the target's object fails its check (content-addressed names only)."""
        if name == CONFIG_NAME:
            return False
        try:
            return storage_id(self.dst.load(name)) != name_to_id(name)
        except NotFound:
            return True

    def _delete_extra(self, wanted: set[str]) -> None:
        for prefix in DELETE_ORDER:
            for name, size in sorted(_listing(self.dst, prefix).items()):
                self.check_stop()
                if name in wanted or not mirrored_name(name):
                    continue
                # the source is asked again: only an object it provably lacks now is deleted
                try:
                    self.src.stat(name)
                    continue
                except NotFound:
                    pass
                if self.opts.keep is not None and self.opts.keep(name):
                    self.res.kept.append(name)
                    self.events(
                        Event(
                            "warning",
                            f"{name} is missing from the repository but its index still lists "
                            "it (lost, not pruned: run check): the mirror's copy is kept",
                        )
                    )
                    continue
                try:
                    self.dst.delete(name)
                except NotFound:
                    continue
                self.res.deleted += 1
                self.res.bytes_deleted += size
                self.events(Event("info", f"deleted {name}", {"name": name, "size": size}))
