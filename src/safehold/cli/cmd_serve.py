"""serve: answer a remote client's storage requests over stdin/stdout (an SSH forced command)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from safehold.backends.remote import Server
from safehold.cli.common import Context
from safehold.errors import EXIT_OK


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "serve",
        parents=[parent],
        help="serve repositories to ssh:// clients (an authorized_keys forced command)",
    )
    s.add_argument(
        "--restrict-to-path",
        default="/",
        metavar="DIR",
        help="only repositories at or below DIR can be opened",
    )
    s.add_argument(
        "--append-only",
        action="store_true",
        help="only add data/, index/, snapshots/ and locks/ objects and overwrite or delete "
        "locks/ objects; refuse everything else (deletes, overwrites, plans/, keys/, config, "
        "init)",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(ctx: Context) -> int:
    a = ctx.args
    Server(a.restrict_to_path, append_only=a.append_only).serve(sys.stdin.buffer, sys.stdout.buffer)
    return EXIT_OK
