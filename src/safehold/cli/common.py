"""What every command shares: options, the repository location, passwords, output."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from safehold.backends.registry import open_backend
from safehold.errors import (
    EXIT_WARNINGS,
    RepositoryNotFound,
    SafeholdError,
    UsageError,
)
from safehold.events import Event
from safehold.ops.access import probe, read_password_file, run_password_command
from safehold.ops.options import LIST_KINDS, Opt, convert
from safehold.repository.cache import prepare_cache_root
from safehold.repository.repo import Repository
from safehold.units import parse_wait


@dataclass
class Context:
    args: argparse.Namespace
    repo: Repository | None = None  # the repository the command opened, if any

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def quiet(self) -> bool:
        return bool(self.args.quiet)

    def out(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def emit(self, obj: Any) -> None:
        print(json.dumps(obj, default=_json_default), flush=True)

    def note(self, text: str) -> None:
        """A message for the user on stderr (also in --json mode)."""
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def data_dir() -> Path:
    return Path(os.environ.get("SAFEHOLD_DATA_DIR") or platformdirs.user_data_dir("safehold"))


def config_dir() -> Path:
    return Path(os.environ.get("SAFEHOLD_CONFIG_DIR") or platformdirs.user_config_dir("safehold"))


def cache_dir(args: argparse.Namespace) -> Path | None:
    """The cache root (``--cache-dir``, ``SAFEHOLD_CACHE_DIR``, ``$XDG_CACHE_HOME/safehold``,
    ``~/.cache/safehold``), made private (0700) and tagged with a ``CACHEDIR.TAG``."""
    if getattr(args, "no_cache", False):
        return None
    if getattr(args, "cache_dir", None):
        root = Path(args.cache_dir)
    else:
        env = os.environ.get("SAFEHOLD_CACHE_DIR")
        root = Path(env) if env else Path(platformdirs.user_cache_dir("safehold"))
    prepare_cache_root(root)
    return root


def default_repo() -> Path:
    return data_dir() / "repository"


def default_password_file() -> Path:
    return config_dir() / "password"


def repo_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The repository URL and whether it is the embedded default."""
    url = args.repo or os.environ.get("SAFEHOLD_REPOSITORY")
    if url:
        return url, False
    return str(default_repo()), True


def backend_options(args: argparse.Namespace) -> dict[str, str]:
    """The ``-o KEY=VALUE`` options as a mapping (a later one wins)."""
    options: dict[str, str] = {}
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"option {item!r} is not KEY=VALUE")
        options[key.strip()] = value
    return options


def _read_file(path: str) -> bytes:
    return read_password_file(path)


def _run_command(cmd: str) -> bytes:
    return run_password_command(cmd)


def get_password(args: argparse.Namespace, *, is_default: bool, confirm: bool = False) -> bytes:
    """First found wins: --password-command, --password-file, SAFEHOLD_PASSWORD_COMMAND,
    SAFEHOLD_PASSWORD_FILE, SAFEHOLD_PASSWORD, the embedded default's file, a prompt on a TTY."""
    if args.password_command:
        return _run_command(args.password_command)
    if args.password_file:
        return _read_file(args.password_file)
    if os.environ.get("SAFEHOLD_PASSWORD_COMMAND"):
        return _run_command(os.environ["SAFEHOLD_PASSWORD_COMMAND"])
    if os.environ.get("SAFEHOLD_PASSWORD_FILE"):
        return _read_file(os.environ["SAFEHOLD_PASSWORD_FILE"])
    if "SAFEHOLD_PASSWORD" in os.environ:
        return os.environ["SAFEHOLD_PASSWORD"].encode()
    if is_default and default_password_file().exists():
        return _read_file(str(default_password_file()))
    return prompt_password("password: ", confirm=confirm)


def prompt_password(prompt: str, *, confirm: bool = False) -> bytes:
    if not sys.stdin.isatty():
        raise UsageError(
            "no password given: set SAFEHOLD_PASSWORD, SAFEHOLD_PASSWORD_FILE or "
            "SAFEHOLD_PASSWORD_COMMAND, or pass --password-file / --password-command"
        )
    import getpass

    pw = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != pw:
        raise UsageError("the passwords do not match")
    if not pw:
        raise UsageError("empty password")
    return pw.encode()


def new_password(args: argparse.Namespace) -> bytes:
    if getattr(args, "new_password_file", None):
        return _read_file(args.new_password_file)
    return prompt_password("new password: ", confirm=True)


def open_repo(ctx: Context, *, use_cache: bool = True) -> Repository:
    url, is_default = repo_url(ctx.args)
    if is_default and not default_repo().exists():
        raise RepositoryNotFound(
            "no repository given: use --repo or SAFEHOLD_REPOSITORY (or run 'safehold backup "
            "PATH' once to create the default repository)"
        )
    backend = open_backend(url, backend_options(ctx.args))
    probe(backend)
    password = get_password(ctx.args, is_default=is_default)
    repo = Repository.open(backend, password, cache_dir=cache_dir(ctx.args) if use_cache else None)
    if repo.config_damaged:
        print(
            f"safehold: warning: {repo.config_damaged}; opened with the copy in the key file "
            "(run 'safehold repair config' to write it back)",
            file=sys.stderr,
        )
    if getattr(ctx.args, "retry_lock", None):
        repo.lock_retry_s = parse_wait(ctx.args.retry_lock)
    ctx.repo = repo
    return repo


def finish_repo(ctx: Context, code: int) -> int:
    """After a command: name the snapshot objects that could not be read and were skipped (a
    warning: exit at least 1), and write the damage found into the repository (full keys)."""
    repo = ctx.repo
    if repo is None:
        return code
    try:
        repo.save_damage()
    except SafeholdError:
        pass  # the local cache keeps the record
    for name, why in sorted(repo.bad_snapshots.items()):
        print(f"safehold: warning: skipped {name}, which cannot be read: {why}", file=sys.stderr)
    if repo.bad_snapshots and code == 0:
        return EXIT_WARNINGS
    return code


def ensure_default_repo(ctx: Context) -> None:
    """Create the embedded default repository and its password file on first use."""
    from safehold.repository.repo import Repository

    repo_path = default_repo()
    pw_file = default_password_file()
    if repo_path.exists() and (repo_path / "config").exists():
        return
    pw_file.parent.mkdir(parents=True, exist_ok=True)
    if not pw_file.exists():
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(pw_file, 0o600)
    password = _read_file(str(pw_file))
    repo_path.parent.mkdir(parents=True, exist_ok=True)
    Repository.init(open_backend(str(repo_path)), password).close()
    ctx.note(
        f"created the default repository at {repo_path}\n"
        f"its password is in {pw_file} (mode 0600): keep a copy of it somewhere safe, "
        "without it the backups cannot be read"
    )


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event; the operation stops cleanly and raises Interrupted."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    old_int = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def snapshot_row(s: Any) -> dict[str, Any]:
    import datetime as dt

    return {
        "id": s.id,
        "short_id": s.id[:8],
        "time": dt.datetime.fromtimestamp(s.time_ns / 1e9).astimezone().isoformat(),
        "host": s.host,
        "user": s.user,
        "paths": s.paths,
        "tags": s.tags,
        "parent": s.parent.hex() if s.parent else None,
        "tree": s.tree.hex(),
        "original": s.original.hex() if s.original else None,
        "summary": s.summary,
    }


def event_printer(ctx: Context, *, info: Callable[[Event], bool] | None = None) -> Any:
    """Warnings on stderr (JSON lines with --json); the ``info`` events it picks on stdout."""

    def sink(ev: Event) -> None:
        if ev.kind == "warning":
            if ctx.json:
                ctx.emit({"type": "warning", "message": ev.message})
            else:
                print(f"warning: {ev.message}", file=sys.stderr, flush=True)
        elif ev.kind == "info" and info is not None and not ctx.json and info(ev):
            ctx.out(ev.message)

    return sink


def add_option_arguments(p: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
    """One argument per option of the table: its value stays None unless given (lists
    collect every use, flags are true when given, other values are converted later)."""
    for o in opts:
        flags = [o.flag] + ([o.short] if o.short else [])
        if o.kind in LIST_KINDS:
            p.add_argument(
                *flags, dest=o.name, action="append", default=None, metavar=o.metavar, help=o.help
            )
        elif o.kind == "bool":
            p.add_argument(*flags, dest=o.name, action="store_true", default=None, help=o.help)
        else:
            p.add_argument(*flags, dest=o.name, default=None, metavar=o.metavar, help=o.help)


def given_options(args: argparse.Namespace, opts: Sequence[Opt]) -> dict[str, Any]:
    """The options given on the command line, by name, converted (UsageError naming the flag)."""
    out: dict[str, Any] = {}
    for o in opts:
        value = getattr(args, o.name, None)
        if value is None:
            continue
        try:
            out[o.name] = convert(o, value)
        except UsageError as e:
            raise UsageError(f"{o.flag}: {e}") from None
    return out
