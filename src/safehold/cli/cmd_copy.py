"""copy (snapshots from another repository) and mirror (a repository's objects elsewhere)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from safehold.backends.registry import open_backend
from safehold.cli.common import (
    Context,
    backend_options,
    cache_dir,
    event_printer,
    open_repo,
    prompt_password,
    repo_url,
    stop_on_signals,
)
from safehold.errors import EXIT_DAMAGE, EXIT_OK, EXIT_WARNINGS, UsageError, WrongPassword
from safehold.events import Event
from safehold.ids import pack_name
from safehold.ops.access import PasswordSource, RepoSpec, open_repository, probe
from safehold.ops.copy import CopyOptions, copy_snapshots
from safehold.ops.mirror import MirrorOptions, mirror
from safehold.repository.repo import Repository
from safehold.units import format_size


def add_from_options(p: argparse.ArgumentParser) -> None:
    """``--from-repo`` and how its password and storage options are given (copy, init)."""
    g = p.add_argument_group("the source repository")
    g.add_argument(
        "--from-repo",
        metavar="URL",
        help="the repository to copy from (or SAFEHOLD_FROM_REPOSITORY)",
    )
    g.add_argument(
        "--from-password-file",
        metavar="FILE",
        help="its password file (or SAFEHOLD_FROM_PASSWORD_FILE, SAFEHOLD_FROM_PASSWORD)",
    )
    g.add_argument(
        "--from-password-command",
        metavar="CMD",
        help="a command printing its password (or SAFEHOLD_FROM_PASSWORD_COMMAND)",
    )
    g.add_argument(
        "--from-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a storage setting of the source, as -o is for --repo (repeatable)",
    )


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


def from_spec(args: argparse.Namespace) -> RepoSpec:
    """Where the source repository is and how its password is found: the first of
    --from-password-command, --from-password-file, SAFEHOLD_FROM_PASSWORD_COMMAND,
    SAFEHOLD_FROM_PASSWORD_FILE, SAFEHOLD_FROM_PASSWORD, a prompt on a terminal."""
    url = args.from_repo or os.environ.get("SAFEHOLD_FROM_REPOSITORY")
    if not url:
        raise UsageError("no source repository given: use --from-repo URL")
    env = os.environ
    if args.from_password_command:
        source = PasswordSource(command=args.from_password_command)
    elif args.from_password_file:
        source = PasswordSource(file=args.from_password_file)
    elif env.get("SAFEHOLD_FROM_PASSWORD_COMMAND"):
        source = PasswordSource(command=env["SAFEHOLD_FROM_PASSWORD_COMMAND"])
    elif env.get("SAFEHOLD_FROM_PASSWORD_FILE"):
        source = PasswordSource(file=env["SAFEHOLD_FROM_PASSWORD_FILE"])
    elif "SAFEHOLD_FROM_PASSWORD" in env:
        source = PasswordSource(env="SAFEHOLD_FROM_PASSWORD")
    elif sys.stdin.isatty():
        source = PasswordSource(value=prompt_password(f"password of {url}: "))
    else:
        raise UsageError(
            "no password given for the source repository: pass --from-password-file or "
            "--from-password-command, or set SAFEHOLD_FROM_PASSWORD_FILE or "
            "SAFEHOLD_FROM_PASSWORD"
        )
    return RepoSpec(
        url=url,
        password=source,
        options=_key_values(args.from_option or [], "--from-option"),
        cache_dir=cache_dir(args),
    )


def open_from_repo(args: argparse.Namespace) -> Repository:
    spec = from_spec(args)
    try:
        return open_repository(spec)
    except WrongPassword as e:
        raise WrongPassword(f"the source repository {spec.url}: {e}") from None


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    c = sub.add_parser(
        "copy",
        parents=[parent],
        help="copy snapshots from another repository into this one",
        description="Copy snapshots from --from-repo into --repo, storing only the data the "
        "target lacks. Snapshots the target has already (copied before) are skipped, and an "
        "interrupted copy goes on where it stopped. A target made with 'init "
        "--copy-chunker-params --from-repo SOURCE' chunks like the source, so copies "
        "deduplicate against each other; otherwise the files are cut again with the target's "
        "chunker.",
    )
    add_from_options(c)
    c.add_argument(
        "snapshots", nargs="*", metavar="SNAPSHOT", help="ids, prefixes or 'latest' (default: all)"
    )
    c.add_argument("--host", metavar="HOST", help="only snapshots of this host")
    c.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="only with this tag (repeatable)"
    )
    c.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="PATH",
        help="only snapshots of this path (repeatable)",
    )
    c.set_defaults(func=cmd_copy)

    m = sub.add_parser(
        "mirror",
        parents=[parent],
        help="copy the repository's stored objects to another location, as they are",
        description="Copy every object of --repo to TARGET (any repository URL, e.g. "
        "rclone:REMOTE:PATH) as it is stored (encrypted; no password is needed), skipping "
        "what is there already with the same size, and verifying what is written. The mirror "
        "opens as a repository with the same passwords. Nothing is deleted at TARGET unless "
        "--delete is given.",
    )
    m.add_argument("target", metavar="TARGET", help="where to mirror to (a repository URL)")
    m.add_argument(
        "--delete",
        action="store_true",
        help="after copying, delete at TARGET the objects the repository no longer has "
        "(asks for the repository's password: a pack its index still lists is never deleted)",
    )
    m.add_argument(
        "--verify",
        action="store_true",
        help="read back every object already at TARGET and replace those that are damaged",
    )
    m.add_argument(
        "--target-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a storage setting of TARGET, as -o is for --repo (repeatable)",
    )
    m.set_defaults(func=cmd_mirror)


def _about_a_snapshot(ev: Event) -> bool:
    return "source" in ev.data


def cmd_copy(ctx: Context) -> int:
    a = ctx.args
    spec = from_spec(a)
    dst = open_repo(ctx)
    try:
        src = open_repository(spec)
        try:
            opts = CopyOptions(snapshots=a.snapshots, host=a.host, tags=a.tag, paths=a.path)
            with stop_on_signals() as stop:
                res = copy_snapshots(
                    src, dst, opts, events=event_printer(ctx, info=_about_a_snapshot), stop=stop
                )
            warned = bool(src.bad_snapshots)
        finally:
            src.close()
    finally:
        dst.close()
    if ctx.json:
        ctx.emit({"type": "copy", **res.as_dict()})
    else:
        ctx.out(
            f"copied {len(res.copied)} snapshots, skipped {len(res.skipped)} the target had "
            f"({res.mode}); added {format_size(res.data_added_stored)} in {res.blobs_new} blobs, "
            f"uploaded {format_size(res.bytes_uploaded)}"
        )
        if res.failed:
            ctx.out(f"{len(res.failed)} snapshots could not be copied (damage in the source)")
    if res.failed:
        return EXIT_DAMAGE
    return EXIT_WARNINGS if warned else EXIT_OK


def _still_indexed(ctx: Context) -> Callable[[str], bool]:
    """For --delete: the packs the repository's index lists (opened with its password: a pack
    missing from the repository while its index lists it was lost, not pruned)."""
    repo = open_repo(ctx)
    try:
        listed = {pack_name(p.pack_id.hex()) for p in repo.reload_index(use_cache=False).packs()}
    finally:
        repo.close()
    return listed.__contains__


def cmd_mirror(ctx: Context) -> int:
    a = ctx.args
    url, _is_default = repo_url(a)
    src = open_backend(url, backend_options(a))
    try:
        probe(src)
        keep = _still_indexed(ctx) if a.delete else None
        dst = open_backend(a.target, _key_values(a.target_option or [], "--target-option"))
        try:
            with stop_on_signals() as stop:
                res = mirror(
                    src,
                    dst,
                    MirrorOptions(delete=a.delete, keep=keep, verify=a.verify),
                    events=event_printer(ctx, info=_about_a_snapshot),
                    stop=stop,
                )
        finally:
            dst.close()
    finally:
        src.close()
    if ctx.json:
        ctx.emit({"type": "mirror", "target": dst.location, **res.as_dict()})
    else:
        line = (
            f"mirrored to {dst.location}: copied {res.copied} objects "
            f"({format_size(res.bytes_copied)}), {res.skipped} already there"
        )
        if a.delete:
            line += f", deleted {res.deleted}"
        if res.repaired:
            line += f", replaced {res.repaired} damaged at the target"
        ctx.out(line)
        if res.failed:
            ctx.out(f"{len(res.failed)} objects not mirrored (see the warnings)")
    if res.failed:
        return EXIT_DAMAGE
    return EXIT_WARNINGS if res.ignored or res.kept else EXIT_OK
