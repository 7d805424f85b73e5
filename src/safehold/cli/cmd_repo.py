"""init, check, key, unlock."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from safehold.backends.registry import open_backend
from safehold.cli.cmd_copy import add_from_options, open_from_repo
from safehold.cli.common import (
    Context,
    backend_options,
    cache_dir,
    event_printer,
    get_password,
    new_password,
    open_repo,
    repo_url,
    stop_on_signals,
)
from safehold.compress import Compression
from safehold.errors import EXIT_DAMAGE, EXIT_OK, EXIT_WARNINGS, UsageError
from safehold.events import Event
from safehold.ops.check import CheckOptions, check
from safehold.ops.repair import repair_config, repair_index, repair_snapshots
from safehold.repository.locks import (
    find_lock,
    list_locks,
    reader_lock,
    remove_lock,
    remove_stale_locks,
)
from safehold.repository.repo import InitOptions, Repository
from safehold.units import format_size, parse_size


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[parent], help="create a repository")
    p.add_argument("--chunk-avg", default=None, metavar="SIZE", help="default: 1M")
    p.add_argument("--compression", default="auto", metavar="auto|zstd[,LEVEL]|none")
    p.add_argument("--pack-size", default="16M", metavar="SIZE")
    p.add_argument(
        "--copy-chunker-params",
        action="store_true",
        help="chunk like --from-repo (its chunk sizes, chunker seed and blob id key), so that "
        "'copy' between the two deduplicates",
    )
    add_from_options(p)
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
    ri = rsub.add_parser(
        "index",
        parents=[parent],
        help="rebuild the index from the packs",
        description="Rebuild the index from the packs in storage. A pack whose header, trailer "
        "or sealed key is damaged is kept: its blobs come from the existing index entries, or "
        "from scanning the pack, each verified. A copy of a pack under a wrong name is reported, "
        "never indexed. Nothing is deleted but the index objects the new one replaces.",
    )
    ri.add_argument("--dry-run", "-n", action="store_true")
    ri.add_argument(
        "--read-data",
        action="store_true",
        help="read every pack whole: check its name against its content and verify every blob; "
        "blobs that fail are left out and recorded as damaged (the next backup stores them again)",
    )
    ri.set_defaults(func=cmd_repair_index)
    rs = rsub.add_parser(
        "snapshots",
        parents=[parent],
        help="write repaired copies of snapshots whose data is lost",
        description="For each snapshot that refers to lost data, write a repaired snapshot "
        "beside it without the lost files (tag 'repaired', dated 1 ns after the original, which "
        "it names). The originals are kept: they restore everything they still can, and whole "
        "again once a backup has stored the lost data again. Remove them with "
        "--forget-originals or 'forget ID'. Running it again repairs nothing twice.",
    )
    rs.add_argument("--dry-run", "-n", action="store_true")
    rs.add_argument(
        "--forget-originals",
        action="store_true",
        help="also remove each damaged original that has a repaired copy (it can no longer heal) "
        "and every snapshot object that cannot be read",
    )
    rs.set_defaults(func=cmd_repair_snapshots)
    rc = rsub.add_parser(
        "config",
        parents=[parent],
        help="write a missing or damaged config back from the copy in the key file",
        description="When the repository's config object is missing or damaged, the repository "
        "opens with the copy each key file holds (a warning says so); this writes it back.",
    )
    rc.add_argument("--dry-run", "-n", action="store_true")
    rc.set_defaults(func=cmd_repair_config)

    u = sub.add_parser("unlock", parents=[parent], help="remove locks that are dead or expired")
    u.add_argument(
        "--force",
        metavar="ID",
        help="remove the lock with this id (prefix), whoever holds it, after confirmation",
    )
    u.add_argument("--yes", "-y", action="store_true", help="with --force: do not ask")
    u.set_defaults(func=cmd_unlock)


def cmd_init(ctx: Context) -> int:
    a = ctx.args
    url, is_default = repo_url(a)
    backend = open_backend(url, backend_options(a))
    if a.copy_chunker_params and a.chunk_avg is not None:
        raise UsageError("--chunk-avg and --copy-chunker-params exclude each other")
    if a.from_repo and not a.copy_chunker_params:
        raise UsageError("init takes --from-repo only with --copy-chunker-params")
    like = None
    if a.copy_chunker_params:
        if not a.from_repo:
            raise UsageError("--copy-chunker-params needs --from-repo URL (the repository to copy)")
        like = open_from_repo(a)
    try:
        password = get_password(a, is_default=is_default, confirm=True)
        try:
            opts = InitOptions(
                chunk_avg=parse_size(a.chunk_avg or "1M"),
                compression=str(Compression.parse(a.compression)),
                pack_size=parse_size(a.pack_size),
                chunker_from=like,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        repo = Repository.init(backend, password, opts, cache_dir=cache_dir(a))
    finally:
        if like is not None:
            like.close()
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
        # check only reads: no lock refuses it; its own lock makes a prune plan made meanwhile
        # wait (and check copes with one that finishes while it runs)
        lock = reader_lock(repo.backend, repo.clock)
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
            with stop_on_signals() as stop:
                res = check(
                    repo,
                    CheckOptions(
                        read_data=a.read_data, subset=a.read_data_subset, state_file=state
                    ),
                    events=sink,
                    stop=stop,
                )
        finally:
            if lock is not None:
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
                "recorded_damage": res.recorded,
                "coverage": res.coverage,
                "cycle": res.cycle,
                "cycle_complete": res.cycle_complete,
            }
        )
    else:
        for n in res.notes:  # damage was printed as found
            ctx.out(f"note: {n}")
        if res.recorded:
            ctx.out(
                f"recorded {res.recorded} damaged blob copies: the next backup stores them again"
            )
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
    a = ctx.args
    if a.yes and not a.force:
        raise UsageError("--yes goes with --force ID (plain unlock removes only stale locks)")
    repo = open_repo(ctx, use_cache=False)
    try:
        if a.force:
            return _unlock_force(ctx, repo, a.force, ask=not a.yes)
        removed = remove_stale_locks(repo.backend)
        left = list_locks(repo.backend)
    finally:
        repo.close()
    if ctx.json:
        ctx.emit(
            {
                "type": "unlock",
                "removed": [lk.lock_id for lk in removed],
                "remaining": [lk.lock_id for lk in left],
            }
        )
        return EXIT_OK
    ctx.out(f"removed {len(removed)} stale locks")
    for lk in left:
        ctx.out(f"left {lk.describe()} (not stale; 'unlock --force {lk.lock_id[:8]}' removes it)")
    return EXIT_OK


def _unlock_force(ctx: Context, repo: Repository, prefix: str, *, ask: bool) -> int:
    """``unlock --force ID``: one named lock, whoever holds it, after confirmation."""
    lock = find_lock(repo.backend, prefix)
    if ask:
        if not sys.stdin.isatty():
            raise UsageError("unlock --force asks for confirmation on a terminal: add --yes")
        live = "" if lock.stale() else " It is not stale: its holder may still be running."
        sys.stderr.write(f"remove {lock.describe()}?{live} [y/N] ")
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            if ctx.json:
                ctx.emit({"type": "unlock", "removed": []})
            else:
                ctx.out(f"kept lock {lock.lock_id[:8]}")
            return EXIT_WARNINGS
    removed = remove_lock(repo.backend, lock.lock_id)
    if ctx.json:
        ctx.emit({"type": "unlock", "removed": [lock.lock_id] if removed else []})
    elif removed:
        ctx.out(f"removed lock {lock.lock_id[:8]} ({lock.describe()})")
    else:
        ctx.out(f"lock {lock.lock_id[:8]} was removed meanwhile")
    return EXIT_OK


def cmd_repair_index(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    dry = ctx.args.dry_run
    try:
        lock = None if dry else repo.lock(exclusive=True)
        try:
            res = repair_index(
                repo, read_data=ctx.args.read_data, dry_run=dry, events=event_printer(ctx)
            )
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
                "recovered_packs": res.recovered_packs,
                "damaged_blobs": res.damaged_blobs,
                "strays": res.strays,
                "copied": res.copied,
                "damage_records": res.damage_records,
                "index": res.new_index,
                "removed_indexes": res.removed_indexes,
            }
        )
    else:
        verb = "would index" if dry else "indexed"
        ctx.out(
            f"{verb} {res.packs} packs ({res.blobs} blobs); "
            f"{len(res.damaged_packs)} unreadable packs left out"
        )
        if res.recovered_packs:
            ctx.out(f"{len(res.recovered_packs)} damaged packs kept (the blobs that verify)")
        if res.damaged_blobs:
            ctx.out(f"{len(res.damaged_blobs)} damaged blobs left out and recorded")
        if res.strays:
            ctx.out(f"{len(res.strays)} copies of packs under a wrong name not indexed")
    damage = res.damaged_packs or res.recovered_packs or res.damaged_blobs or res.strays
    return EXIT_OK if not damage else EXIT_WARNINGS


def cmd_repair_snapshots(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    dry = ctx.args.dry_run
    try:
        lock = None if dry else repo.lock(exclusive=True)
        try:
            res = repair_snapshots(
                repo,
                dry_run=dry,
                forget_originals=ctx.args.forget_originals,
                events=event_printer(ctx),
            )
        finally:
            if lock is not None:
                lock.release()
    finally:
        repo.close()
    if ctx.json:
        ctx.emit(
            {
                "type": "repair_snapshots",
                "rewritten": res.rewritten,
                "dropped": res.dropped,
                "forgotten": res.forgotten,
                "unreadable": res.unreadable,
                "removed_unreadable": res.removed_unreadable,
            }
        )
        return EXIT_OK
    for old, new in res.rewritten.items():
        ctx.out(f"snapshot {old[:8]} repaired as {new[:8]}" if new else f"would repair {old[:8]}")
    verb = "would rewrite" if dry else "rewrote"
    ctx.out(f"{verb} {len(res.rewritten)} snapshots (the originals are kept)")
    if res.forgotten:
        verb = "would forget" if dry else "forgot"
        ctx.out(f"{verb} {len(res.forgotten)} original snapshots")
    if res.removed_unreadable:
        verb = "would remove" if dry else "removed"
        ctx.out(f"{verb} {len(res.removed_unreadable)} snapshot objects that cannot be read")
    elif res.unreadable:
        ctx.out(
            f"{len(res.unreadable)} snapshot objects cannot be read; --forget-originals (or "
            "'forget ID') removes them"
        )
    return EXIT_OK


def cmd_repair_config(ctx: Context) -> int:
    repo = open_repo(ctx, use_cache=False)
    try:
        lock = None if ctx.args.dry_run else repo.lock(exclusive=True)
        try:
            done = repair_config(repo, dry_run=ctx.args.dry_run)
        finally:
            if lock is not None:
                lock.release()
    finally:
        repo.close()
    if ctx.json:
        ctx.emit({"type": "repair_config", "written": done, "dry_run": bool(ctx.args.dry_run)})
    elif not done:
        ctx.out("the config is intact: nothing to do")
    else:
        ctx.out("would write the config back" if ctx.args.dry_run else "wrote the config back")
    return EXIT_OK
