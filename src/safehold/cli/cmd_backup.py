"""backup and restore."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from safehold.cli.common import (
    Context,
    add_option_arguments,
    ensure_default_repo,
    event_printer,
    given_options,
    open_repo,
    repo_url,
    stop_on_signals,
)
from safehold.errors import EXIT_DAMAGE, EXIT_ERROR, EXIT_OK, EXIT_WARNINGS, UsageError
from safehold.events import Event
from safehold.ops.backup import backup
from safehold.ops.options import BACKUP_OPTS, backup_options
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.locks import reader_lock
from safehold.units import format_size

RESTORE_DESCRIPTION = """\
Restore a snapshot (or the entries selected by --include/--exclude) under DIR.

Each file is written under a hidden temporary name in its directory and renamed
into place only once it is complete and verified: a file that cannot be restored
whole (damaged or missing data, a full disk, an I/O error) never appears under its
name, and an existing file of that name is left as it was. Damage costs only what
it touches: every other entry is restored, and each entry not restored is named.

DIR is made if missing. DIR itself may be a symlink to a directory (followed, as
cd would); no symlink below it is ever followed.

exit status:
  0  everything was restored
  1  warnings only: entries restore does not create (sockets; devices unless run
     as root) were named and skipped, or an owner could not be set
  2  an entry could not be written to the target (disk full, I/O error), or
     another error stopped the restore
  4  the repository is damaged: entries whose data or directory could not be read
     were named and skipped (takes precedence over 2); or the snapshot's trees
     expand beyond what it recorded (damaged or hostile): nothing is restored
  130 interrupted (SIGINT, SIGTERM): files being written are removed; while the
     snapshot is still being read, before anything is written, nothing is written
"""


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[parent], help="back up files and directories")
    p.add_argument("paths", nargs="*", metavar="PATH")
    add_option_arguments(p, BACKUP_OPTS)
    p.add_argument("--dry-run", "-n", action="store_true")
    p.add_argument("--stdin", action="store_true", help="back up standard input")
    p.add_argument(
        "--stdin-from-command",
        metavar="CMD",
        help="back up the standard output of the shell command CMD (the backup fails if it fails)",
    )
    p.add_argument(
        "--stdin-filename",
        default="stdin",
        metavar="NAME",
        help="the file name for --stdin or --stdin-from-command (default: stdin)",
    )
    p.set_defaults(func=cmd_backup)

    r = sub.add_parser(
        "restore",
        parents=[parent],
        help="restore a snapshot",
        description=RESTORE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("snapshot", metavar="SNAP")
    r.add_argument("--target", "-t", required=True, metavar="DIR")
    r.add_argument("--include", "-i", action="append", default=[], metavar="PATTERN")
    r.add_argument("--exclude", "-e", action="append", default=[], metavar="PATTERN")
    r.add_argument("--verify", action="store_true", help="read the restored files back")
    r.add_argument("--host")
    r.add_argument("--tag", action="append", default=[])
    r.add_argument("--path", action="append", default=[])
    r.set_defaults(func=cmd_restore)


class _Progress:
    """A rich progress bar on a TTY; JSON-lines events with --json; nothing otherwise."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.warn = event_printer(ctx)
        self.bar: Any = None
        self.task: Any = None
        if not ctx.json and not ctx.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.fields[files]} files"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.task = self.bar.add_task("backup", total=None, files=0)
            self.bar.start()

    def __call__(self, ev: Event) -> None:
        if ev.kind == "progress":
            d = ev.data
            if self.ctx.json:
                self.ctx.emit({"type": "progress", **d})
            elif self.bar is not None:
                self.bar.update(
                    self.task,
                    completed=d.get("bytes_done", 0),
                    total=d.get("total_bytes"),
                    files=d.get("files_done", 0),
                )
        elif ev.kind == "info" and "stderr" in ev.data:
            self.command_stderr(ev)
        else:
            if self.bar is not None and ev.kind == "warning":
                self.bar.console.print(f"warning: {ev.message}")
            else:
                self.warn(ev)

    def command_stderr(self, ev: Event) -> None:
        """The standard error of a --stdin-from-command command (its last 64 KiB)."""
        if self.ctx.json:
            self.ctx.emit({"type": "command_stderr", "message": ev.message, **ev.data})
            return
        if self.ctx.quiet:
            return
        text = ev.data["stderr"]
        if self.bar is not None:
            self.bar.console.print(f"{ev.message}:", markup=False, highlight=False)
            self.bar.console.print(text.rstrip("\n"), markup=False, highlight=False)
        else:
            print(f"{ev.message}:", file=sys.stderr)
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def cmd_backup(ctx: Context) -> int:
    a = ctx.args
    command = a.stdin_from_command
    if a.stdin and command is not None:
        raise UsageError("--stdin and --stdin-from-command exclude each other")
    if a.stdin and a.paths:
        raise UsageError("--stdin takes no paths")
    if command is not None and a.paths:
        raise UsageError("--stdin-from-command takes no paths")
    if not a.stdin and command is None and not a.paths:
        raise UsageError("nothing to back up: name at least one path")
    opts = backup_options(
        given_options(a, BACKUP_OPTS),
        paths=a.paths,
        dry_run=a.dry_run,
        stdin_filename=a.stdin_filename if a.stdin or command is not None else None,
        stdin_command=command,
    )
    _, is_default = repo_url(a)
    if is_default:
        ensure_default_repo(ctx)
    repo = open_repo(ctx)
    progress = _Progress(ctx)
    try:
        with stop_on_signals() as stop:
            result = backup(
                repo,
                opts,
                events=progress,
                stdin=sys.stdin.buffer if a.stdin else None,  # type: ignore[arg-type]
                stop=stop,
                estimate_totals=progress.bar is not None,
            )
    finally:
        progress.close()
        repo.close()
    s = result.summary
    if ctx.json:
        ctx.emit({"type": "summary", **s})
    else:
        carried = f", {s['files_carried']} carried" if s.get("files_carried") else ""
        ctx.out(
            f"files: {s['files_new']} new, {s['files_changed']} changed, "
            f"{s['files_unmodified']} unmodified{carried}; {s['dirs']} directories"
        )
        ctx.out(
            f"processed {format_size(s['bytes_processed'])} in {s['duration_s']:.1f}s, "
            f"added {format_size(s['data_added'])} "
            f"({format_size(s['data_added_stored'])} stored)"
        )
        if result.snapshot is not None:
            ctx.out(f"snapshot {result.snapshot.id[:8]} saved")
        else:
            ctx.out("dry run: nothing was stored")
    if result.warnings:
        ctx.note(f"{len(result.warnings)} warnings: the files named above were not saved whole")
        return EXIT_WARNINGS
    return EXIT_OK


def cmd_restore(ctx: Context) -> int:
    a = ctx.args
    repo = open_repo(ctx)
    started = time.time()
    try:
        snap = repo.find_snapshot(a.snapshot, host=a.host, tags=a.tag, paths=a.path)
        opts = RestoreOptions(
            target=a.target, includes=a.include, excludes=a.exclude, verify=a.verify
        )
        with stop_on_signals() as stop:
            lock = reader_lock(repo.backend, repo.clock)  # no other lock blocks reading
            try:
                res = restore(repo, snap, opts, events=event_printer(ctx), stop=stop)
            finally:
                if lock is not None:
                    lock.release()
    finally:
        repo.close()
    elapsed = time.time() - started
    if ctx.json:
        ctx.emit(
            {
                "type": "summary",
                "snapshot": snap.id,
                "files": res.files,
                "dirs": res.dirs,
                "others": res.others,
                "bytes": res.bytes,
                "failed": [
                    {"path": f.path, "reason": f.reason, "damage": f.damage} for f in res.failed
                ],
                "not_restored": res.not_restored,
                "warnings": res.warnings,
                "errors": res.errors,
                "verified": res.verified,
                "duration_s": round(elapsed, 3),
            }
        )
    else:
        ctx.out(
            f"restored snapshot {snap.id[:8]}: {res.files} files, {res.dirs} directories, "
            f"{res.others} other entries, {format_size(res.bytes)} in {elapsed:.1f}s "
            f"to {a.target}"
        )
        if a.verify:
            ctx.out(f"verified {res.verified} files")
        if res.failed:
            damaged = sum(1 for f in res.failed if f.damage)
            ctx.out(
                f"failed: {len(res.failed)} entries not restored ({damaged} damaged in the "
                f"repository, {len(res.failed) - damaged} not written to the target):"
            )
            for f in res.failed:
                ctx.out(f"  {f.path}: {f.reason}")
        if res.not_restored:
            ctx.out(f"{len(res.not_restored)} entries of kinds restore does not create skipped")
    if res.damaged:
        return EXIT_DAMAGE
    if res.failed:
        return EXIT_ERROR
    if res.not_restored or res.warnings:
        return EXIT_WARNINGS
    return EXIT_OK
