"""snapshots, ls, find, diff, dump, stats."""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import os
import stat
import sys
from collections.abc import Iterator
from typing import Any

from safehold.cli.common import Context, open_repo, snapshot_row
from safehold.errors import (
    EXIT_DAMAGE,
    EXIT_ERROR,
    EXIT_OK,
    IntegrityError,
    NotFound,
    SafeholdError,
    UsageError,
)
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node
from safehold.ops.prune import referenced_blobs
from safehold.ops.walk import (
    Parts,
    TreeTotals,
    entry_limit,
    records_counts,
    snapshot_totals,
    tree_totals,
    walk_tree,
)
from safehold.repository.repo import Repository, filter_snapshots
from safehold.units import format_size


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", metavar="HOST")
        p.add_argument("--tag", action="append", default=[], metavar="TAG")
        p.add_argument("--path", action="append", default=[], metavar="PATH")

    s = sub.add_parser("snapshots", parents=[parent], help="list snapshots")
    filters(s)
    s.set_defaults(func=cmd_snapshots)

    ls = sub.add_parser("ls", parents=[parent], help="list the files of a snapshot")
    ls.add_argument("snapshot", metavar="SNAP")
    ls.add_argument("dir", nargs="?", default="/", metavar="PATH")
    ls.add_argument("--long", "-l", action="store_true")
    filters(ls)
    ls.set_defaults(func=cmd_ls)

    f = sub.add_parser("find", parents=[parent], help="find files in snapshots")
    f.add_argument("pattern", metavar="PATTERN")
    filters(f)
    f.set_defaults(func=cmd_find)

    d = sub.add_parser("diff", parents=[parent], help="compare two snapshots")
    d.add_argument("snap1", metavar="SNAP1")
    d.add_argument("snap2", metavar="SNAP2")
    d.set_defaults(func=cmd_diff)

    du = sub.add_parser("dump", parents=[parent], help="write a file of a snapshot to stdout")
    du.add_argument("snapshot", metavar="SNAP")
    du.add_argument("file", metavar="FILE")
    filters(du)
    du.set_defaults(func=cmd_dump)

    st = sub.add_parser("stats", parents=[parent], help="sizes of the repository or a snapshot")
    st.add_argument("snapshot", nargs="?", metavar="SNAP")
    filters(st)
    st.set_defaults(func=cmd_stats)


def _find(repo: Repository, a: argparse.Namespace, spec: str) -> Any:
    return repo.find_snapshot(spec, host=a.host, tags=a.tag, paths=a.path)


def cmd_snapshots(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    snaps = filter_snapshots(repo.snapshots(), host=a.host, tags=a.tag, paths=a.path)
    repo.close()
    if ctx.json:
        ctx.emit([snapshot_row(s) for s in snaps])
        return EXIT_OK
    ctx.out(f"{'ID':8}  {'TIME':19}  {'HOST':12}  {'TAGS':12}  PATHS")
    for s in snaps:
        t = dt.datetime.fromtimestamp(s.time_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        ctx.out(
            f"{s.id[:8]}  {t}  {s.host[:12]:12}  {','.join(s.tags)[:12]:12}  {', '.join(s.paths)}"
        )
    ctx.out(f"{len(snaps)} snapshots")
    return EXIT_OK


def _node_row(path: str, n: Node) -> dict[str, Any]:
    return {
        "path": path,
        "type": n.type,
        "mode": stat.filemode(n.mode),
        "size": n.size,
        "mtime": dt.datetime.fromtimestamp(n.mtime_ns / 1e9).astimezone().isoformat(),
        "uid": n.uid,
        "gid": n.gid,
        "user": n.user,
        "group": n.group,
        **({"target": os.fsdecode(n.target)} if n.type == "symlink" else {}),
    }


def _long(path: str, n: Node) -> str:
    t = dt.datetime.fromtimestamp(n.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    owner = f"{n.user or n.uid}/{n.group or n.gid}"
    extra = f" -> {os.fsdecode(n.target)}" if n.type == "symlink" else ""
    return f"{stat.filemode(n.mode)} {owner:>15} {n.size:>12} {t} {path}{extra}"


def _subtree(repo: Repository, tree: bytes, path: str) -> tuple[bytes, Parts]:
    cur = tree
    parts = tuple(os.fsencode(p) for p in path.split("/") if p)
    for part in parts:
        match = [n for n in repo.read_tree(cur) if n.name == part]
        if not match or match[0].subtree is None:
            raise UsageError(f"{path} is not a directory in the snapshot")
        cur = match[0].subtree
    return cur, parts


def _path(parts: Parts) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in parts)


class _Walker:
    """Walks snapshot trees for ls, find and diff: iteratively, bounded by what each snapshot
    recorded (a snapshot recording no counts is first sized by reading each distinct tree once,
    so a hostile DAG is refused before it is listed); a directory that cannot be read is named
    on stderr and skipped, and sets the exit status."""

    def __init__(self, ctx: Context, repo: Repository, *, skip_unreadable: bool = True) -> None:
        self.ctx = ctx
        self.repo = repo
        self.skip = skip_unreadable
        self.code = EXIT_OK
        self.memo: dict[bytes, TreeTotals] = {}

    def warn(self, msg: str, err: SafeholdError) -> None:
        damage = isinstance(err, (IntegrityError, NotFound))
        self.code = max(self.code, EXIT_DAMAGE if damage else EXIT_ERROR)
        if self.ctx.json:
            self.ctx.emit({"type": "warning", "message": msg})
        else:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def unreadable(self, parts: Parts, err: SafeholdError) -> None:
        self.warn(f"cannot read {_path(parts)}, skipped: {err}", err)

    def walk(
        self, snap: Snapshot, tree: bytes | None = None, prefix: Parts = ()
    ) -> Iterator[tuple[str, Node]]:
        tree = snap.tree if tree is None else tree
        limit = entry_limit(snap)
        if not records_counts(snap):
            tree_totals(self.repo, tree, limit=limit, memo=self.memo, on_error=lambda p, e: None)
        on_error = self.unreadable if self.skip else None
        for parts, n in walk_tree(self.repo, tree, prefix=prefix, limit=limit, on_error=on_error):
            yield _path(parts), n


def cmd_ls(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    snap = _find(repo, a, a.snapshot)
    tree, prefix = _subtree(repo, snap.tree, a.dir)
    w = _Walker(ctx, repo)
    for path, n in w.walk(snap, tree, prefix):
        if ctx.json:
            ctx.emit(_node_row(path, n))
        else:
            ctx.out(_long(path, n) if a.long else path)
    repo.close()
    return w.code


def cmd_find(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    found = 0
    w = _Walker(ctx, repo)
    for snap in filter_snapshots(repo.snapshots(), host=a.host, tags=a.tag, paths=a.path):
        try:
            for path, n in w.walk(snap):
                name = path.rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(name, a.pattern) or fnmatch.fnmatchcase(path, a.pattern):
                    found += 1
                    if ctx.json:
                        ctx.emit({"snapshot": snap.id, **_node_row(path, n)})
                    else:
                        ctx.out(f"{snap.id[:8]}  {_long(path, n)}")
        except SafeholdError as e:  # one bad snapshot does not hide the others
            w.warn(f"snapshot {snap.id[:8]} skipped: {e}", e)
    repo.close()
    if not ctx.json:
        ctx.note(f"{found} matches")
    return w.code


def _flatten(w: _Walker, snap: Snapshot) -> dict[str, Node]:
    return dict(w.walk(snap))


def cmd_diff(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    snaps = repo.snapshots()
    s1 = repo.find_snapshot(a.snap1, snapshots=snaps)
    s2 = repo.find_snapshot(a.snap2, snapshots=snaps)
    w = _Walker(ctx, repo, skip_unreadable=False)  # a partial listing would show false changes
    f1, f2 = _flatten(w, s1), _flatten(w, s2)
    repo.close()
    counts = {"added": 0, "removed": 0, "modified": 0, "metadata": 0}
    for path in sorted(set(f1) | set(f2)):
        n1, n2 = f1.get(path), f2.get(path)
        if n1 is None:
            change, sign = "added", "+"
        elif n2 is None:
            change, sign = "removed", "-"
        elif n1.type != n2.type or n1.content != n2.content or n1.target != n2.target:
            change, sign = "modified", "M"
        elif (n1.mode, n1.mtime_ns, n1.uid, n1.gid) != (n2.mode, n2.mtime_ns, n2.uid, n2.gid):
            change, sign = "metadata", "U"
        else:
            continue
        counts[change] += 1
        if ctx.json:
            ctx.emit({"path": path, "change": change})
        else:
            ctx.out(f"{sign}    {path}")
    if ctx.json:
        ctx.emit({"type": "summary", **counts})
    else:
        ctx.out(
            f"{counts['added']} added, {counts['removed']} removed, "
            f"{counts['modified']} modified, {counts['metadata']} metadata changes"
        )
    return EXIT_OK


def cmd_dump(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    snap = _find(repo, a, a.snapshot)
    parent, _, name = a.file.rstrip("/").rpartition("/")
    tree, _ = _subtree(repo, snap.tree, parent)
    match = [n for n in repo.read_tree(tree) if n.name == os.fsencode(name)]
    if not match or match[0].type != "file":
        raise UsageError(f"{a.file} is not a file in snapshot {snap.id[:8]}")
    out = sys.stdout.buffer
    for bid in match[0].content or []:
        out.write(repo.read_blob(bid))
    out.flush()
    repo.close()
    return EXIT_OK


def cmd_stats(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    index = repo.index
    if a.snapshot:
        snaps = [_find(repo, a, a.snapshot)]
    else:
        snaps = filter_snapshots(repo.snapshots(), host=a.host, tags=a.tag, paths=a.path)
    files = size = 0
    memo: dict[bytes, TreeTotals] = {}  # each distinct tree is read and counted once
    for s in snaps:  # every file of every snapshot, as a restore of each would write it
        try:
            totals = snapshot_totals(repo, s, memo=memo)
        except IntegrityError as e:
            raise IntegrityError(f"snapshot {s.id[:8]}: {e}") from None
        files += totals.files
        size += totals.bytes
    blobs = referenced_blobs(repo, snaps)  # each stored blob once
    raw = stored = 0
    for b in blobs:
        loc = index.lookup(b)
        if loc is not None:
            raw += loc.entry.raw_length
            stored += loc.entry.length
    repo_bytes = sum(p.size for p in index.packs())
    repo.close()
    res = {
        "snapshots": len(snaps),
        "files": files,
        "total_size": size,
        "blobs": len(blobs),
        "unique_size": raw,
        "stored_size": stored,
        "repository_size": repo_bytes,
        "dedup_ratio": round(size / raw, 3) if raw else None,
        "compression_ratio": round(raw / stored, 3) if stored else None,
    }
    if ctx.json:
        ctx.emit(res)
    else:
        ctx.out(f"snapshots: {len(snaps)}\nfiles: {files}\ntotal size: {format_size(size)}")
        ctx.out(f"unique data: {format_size(raw)}, stored {format_size(stored)}")
        ctx.out(f"repository (all packs): {format_size(repo_bytes)}")
    return EXIT_OK
