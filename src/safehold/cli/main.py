"""The ``safehold`` command: parse arguments, run the command, map errors to exit codes."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import traceback

from safehold._version import __version__
from safehold.cli import (
    cmd_backup,
    cmd_browse,
    cmd_copy,
    cmd_forget,
    cmd_jobs,
    cmd_repo,
    cmd_schedule,
    cmd_serve,
)
from safehold.cli.common import Context, finish_repo
from safehold.errors import EXIT_ERROR, EXIT_INTERRUPTED, SafeholdError


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options")
    g.add_argument(
        "--repo",
        "-r",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="repository (or SAFEHOLD_REPOSITORY); default: the embedded local one",
    )
    g.add_argument(
        "--option",
        "-o",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="a storage setting, e.g. s3.endpoint=http://host:9000 (repeatable)",
    )
    g.add_argument(
        "--retry-lock",
        default=argparse.SUPPRESS,
        metavar="WAIT",
        help="wait up to WAIT (30s, 5m, 1h) for another client's lock instead of failing",
    )
    g.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="the jobs file (default: safehold.toml in the config directory, then "
        "/etc/safehold/safehold.toml)",
    )
    g.add_argument("--password-file", "-p", default=argparse.SUPPRESS, metavar="FILE")
    g.add_argument("--password-command", default=argparse.SUPPRESS, metavar="CMD")
    g.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR")
    g.add_argument("--no-cache", action="store_true", default=argparse.SUPPRESS)
    g.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    g.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    g.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )

    parser = argparse.ArgumentParser(
        prog="safehold",
        parents=[common],
        description="Deduplicated, compressed, end-to-end encrypted, versioned backups.",
    )
    parser.add_argument("--version", action="version", version=f"safehold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmd_repo.add_parsers(sub, common)
    cmd_backup.add_parsers(sub, common)
    cmd_browse.add_parsers(sub, common)
    cmd_forget.add_parsers(sub, common)
    cmd_serve.add_parsers(sub, common)
    cmd_copy.add_parsers(sub, common)
    cmd_jobs.add_parsers(sub, common)
    cmd_schedule.add_parsers(sub, common)
    return parser


_DEFAULTS: dict[str, object] = {
    "repo": None,
    "option": [],
    "retry_lock": None,
    "config": None,
    "password_file": None,
    "password_command": None,
    "cache_dir": None,
    "no_cache": False,
    "json": False,
    "quiet": False,
    "debug": False,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for k, v in _DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    ctx = Context(args)
    try:
        code: int = args.func(ctx)
        return finish_repo(ctx, code)
    except SafeholdError as e:
        finish_repo(ctx, e.exit_code)
        if args.debug:
            traceback.print_exc()
        print(f"safehold: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("safehold: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except sqlite3.Error as e:  # the jobs' run history (state directory)
        if args.debug:
            traceback.print_exc()
        print(f"safehold: the run history cannot be used: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as e:
        if args.debug:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"safehold: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"safehold: internal error: {type(e).__name__}: {e} (run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def run() -> None:
    sys.exit(main())
