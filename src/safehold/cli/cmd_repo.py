"""init, check, key, unlock."""

from __future__ import annotations

import argparse
from typing import Any

from safehold.backends.registry import open_backend
from safehold.cli.common import (
    Context,
    backend_options,
    cache_dir,
    event_printer,
    get_password,
    new_password,
    open_repo,
    repo_url,
)
from safehold.compress import Compression
from safehold.errors import EXIT_DAMAGE, EXIT_OK, UsageError
from safehold.events import Event
from safehold.ops.check import CheckOptions, check
from safehold.ops.repair import repair_index, repair_snapshots
from safehold.repository.locks import remove_stale_locks
from safehold.repository.repo import InitOptions, Repository
from safehold.units import format_size, parse_size


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[parent], help="create a repository")
    p.add_argument("--chunk-avg", default="1M", metavar="SIZE")
    p.add_argument("--compression", default="auto", metavar="auto|zstd[,LEVEL]|none")
    p.add_argument("--pack-size", default="16M", metavar="SIZE")
    p.set_defaults(func=cmd_init)

    c = sub.add_parser("check", parents=[parent], help="check the repository for damage")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--read-data", action="store_true", help="read and verify every blob")
    g.add_argument("--read-data-subset", metavar="N%|n/t")
    c.set_defaults(func=cmd_check)

    k = sub.add_parser("key", parents=[parent], help="manage the repository's keys")
    ksub = k.add_subparsers(dest="key_command", required=True, metavar="list|add|remove|passwd")
    ksub.add_parser("list", parents=[parent]).set_defaults(func=cmd_key_list)
    ka = ksub.add_parser("add", parents=[parent])
    ka.add_argument("--new-password-file", metavar="FILE")
    ka.set_defaults(func=cmd_key_add)
    kr = ksub.add_parser("remove", parents=[parent])
    kr.add_argument("key_id", metavar="ID")
    kr.set_defaults(func=cmd_key_remove)
    kp = ksub.add_parser("passwd", parents=[parent])
    kp.add_argument("--new-password-file", metavar="FILE")
    kp.set_defaults(func=cmd_key_passwd)

    r = sub.add_parser("repair", parents=[parent], help="repair the index or snapshots")
    rsub = r.add_subparsers(dest="repair_command", required=True, metavar="index|snapshots")
    ri = rsub.add_parser("index", parents=[parent], help="rebuild the index from the packs")
    ri.add_argument("--dry-run", "-n", action="store_true")
    ri.set_defaults(func=cmd_repair_index)
    rs = rsub.add_parser("snapshots", parents=[parent], help="rewrite snapshots whose data is lost")
    rs.add_argument("--dry-run", "-n", action="store_true")
    rs.set_defaults(func=cmd_repair_snapshots)

    u = sub.add_parser("unlock", parents=[parent], help="remove locks that are dead or expired")
    u.set_defaults(func=cmd_unlock)


def cmd_init(ctx: Context) -> int:
    a = ctx.args
    url, is_default = repo_url(a)
    backend = open_backend(url, backend_options(a))
    password = get_password(a, is_default=is_default, confirm=True)
    try:
        opts = InitOptions(
            chunk_avg=parse_size(a.chunk_avg),
            compression=str(Compression.parse(a.compression)),
            pack_size=parse_size(a.pack_size),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    repo = Repository.init(backend, password, opts, cache_dir=cache_dir(a))
    if ctx.json:
        ctx.emit({"type": "init", "repository": backend.location, "id": repo.config.repo_id.hex()})
    else:
        ctx.out(f"created repository {repo.config.repo_id.hex()[:10]} at {backend.location}")
        ctx.out("keep the password safe: without it the backups cannot be read")
    repo.close()
    return EXIT_OK


def cmd_check(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx, use_cache=False)
    try:
        lock = repo.lock()
        try:

            def sink(ev: Event) -> None:
                if ev.kind == "damage" and not ctx.json:
                    print(f"damage: {ev.message}", flush=True)

            cache = cache_dir(a)
            state = (
                cache / repo.config.repo_id.hex() / "check-subset.json"
                if cache is not None
                else None
            )
            res = check(
                repo,
                CheckOptions(read_data=a.read_data, subset=a.read_data_subset, state_file=state),
                events=sink,
            )
        finally:
            lock.release()
    finally:
        repo.close()
    if ctx.json:
        ctx.emit(
            {
                "type": "check",
                "ok": res.ok,
                "errors": res.errors,
                "notes": res.notes,
                "snapshots": res.snapshots,
                "trees": res.trees,
                "packs": res.packs,
                "packs_read": res.packs_read,
                "bytes_read": res.bytes_read,
                "damaged_files": res.damaged_files,
                "coverage": res.coverage,
                "cycle": res.cycle,
                "cycle_complete": res.cycle_complete,
            }
        )
    else:
        for n in res.notes:
            ctx.out(f"note: {n}")
        for e in res.errors:
            if e.startswith("snapshot") and "file" in e:
                print(f"damage: {e}", flush=True)
        read = ""
        if res.packs_read:
            read = f", read {res.packs_read} packs ({format_size(res.bytes_read)})"
        ctx.out(f"checked {res.snapshots} snapshots, {res.trees} trees, {res.packs} packs{read}")
        if a.read_data_subset:
            done = " (cycle complete)" if res.cycle_complete else ""
            ctx.out(f"subset cycle {res.cycle}: {res.coverage:.0%} of the packs read{done}")
        ctx.out("no errors were found" if res.ok else f"{len(res.errors)} errors found")
    return EXIT_OK if res.ok else EXIT_DAMAGE


def cmd_key_list(ctx: Context) -> int:
    repo = open_repo(ctx)
    keys = repo.list_keys()
    repo.close()
    if ctx.json:
        ctx.emit(
            [
                {
                    "id": k.key_id,
                    "kind": k.kind,
                    "created": k.created,
                    "host": k.host,
                    "user": k.user,
                    "current": k.current,
                }
                for k in keys
            ]
        )
    else:
        ctx.out(f"{'':1} {'ID':10} {'KIND':10} {'USER@HOST':24} CREATED")
        for k in keys:
            ctx.out(
                f"{'*' if k.current else ' '} {k.key_id[:10]} {k.kind:10} "
                f"{k.user + '@' + k.host:24} {k.created}"
            )
    return EXIT_OK


def cmd_key_add(ctx: Context) -> int:
    repo = open_repo(ctx)
    kid = repo.add_key(new_password(ctx.args))
    repo.close()
    ctx.emit({"type": "key_added", "id": kid}) if ctx.json else ctx.out(f"added key {kid[:10]}")
    return EXIT_OK


def cmd_key_remove(ctx: Context) -> int:
    repo = open_repo(ctx)
    kid = repo.remove_key(ctx.args.key_id)
    repo.close()
    if ctx.json:
        ctx.emit({"type": "key_removed", "id": kid})
    else:
        ctx.out(f"removed key {kid[:10]}")
    return EXIT_OK


def cmd_key_passwd(ctx: Context) -> int:
    repo = open_repo(ctx)
    kid = repo.change_password(new_password(ctx.args))
    repo.close()
    if ctx.json:
        ctx.emit({"type": "key_changed", "id": kid})
    else:
        ctx.out(f"password changed (key {kid[:10]})")
    return EXIT_OK


def cmd_unlock(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    removed = remove_stale_locks(repo.backend)
    repo.close()
    if ctx.json:
        ctx.emit({"type": "unlock", "removed": [lk.lock_id for lk in removed]})
    else:
        ctx.out(f"removed {len(removed)} stale locks")
    return EXIT_OK


def cmd_repair_index(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    try:
        lock = None if ctx.args.dry_run else repo.lock(exclusive=True)
        try:
            res = repair_index(repo, dry_run=ctx.args.dry_run, events=event_printer(ctx))
        finally:
            if lock is not None:
                lock.release()
    finally:
        repo.close()
    if ctx.json:
        ctx.emit(
            {
                "type": "repair_index",
                "packs": res.packs,
                "blobs": res.blobs,
                "damaged_packs": res.damaged_packs,
                "index": res.new_index,
                "removed_indexes": res.removed_indexes,
            }
        )
    else:
        verb = "would index" if ctx.args.dry_run else "indexed"
        ctx.out(
            f"{verb} {res.packs} packs ({res.blobs} blobs); "
            f"{len(res.damaged_packs)} unreadable packs left out"
        )
    return EXIT_OK if not res.damaged_packs else 1


def cmd_repair_snapshots(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    try:
        lock = None if ctx.args.dry_run else repo.lock(exclusive=True)
        try:
            res = repair_snapshots(repo, dry_run=ctx.args.dry_run)
        finally:
            if lock is not None:
                lock.release()
    finally:
        repo.close()
    if ctx.json:
        ctx.emit({"type": "repair_snapshots", "rewritten": res.rewritten, "dropped": res.dropped})
        return EXIT_OK
    for line in res.dropped:
        ctx.out(f"dropped {line}")
    verb = "would rewrite" if ctx.args.dry_run else "rewrote"
    ctx.out(f"{verb} {len(res.rewritten)} snapshots")
    return EXIT_OK
