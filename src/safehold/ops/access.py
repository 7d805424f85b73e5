"""Opening a repository from where it is and how its password is found.

The CLI (``--repo``, ``--password-file``...), the jobs file (``[repositories.NAME]``) and library
users share this: a :class:`RepoSpec` names the URL, backend options and password source, and
:func:`open_repository` checks the config before asking for a password (an unknown format or a
missing repository fails first) and opens it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safehold.backends.base import Backend
from safehold.backends.registry import open_backend
from safehold.errors import (
    FormatError,
    Interrupted,
    NotFound,
    RepositoryNotFound,
    UnsupportedVersion,
    UsageError,
)
from safehold.format.config import split_config
from safehold.ops.shell import run_shell
from safehold.repository.keys import readable_key_file
from safehold.repository.repo import Repository


def read_password_file(path: str) -> bytes:
    """A password file's content without its trailing newline."""
    try:
        with open(path, "rb") as f:
            return f.read().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read password file {path}: {e.strerror}") from None


def run_password_command(
    cmd: str, *, timeout_s: float | None = None, stop: threading.Event | None = None
) -> bytes:
    """A password command's standard output without its trailing newline. After ``timeout_s``
    (a password manager waiting for a prompt nobody sees), or when ``stop`` is set, its process
    group is stopped."""
    try:
        r = run_shell(cmd, stop=stop, timeout_s=timeout_s, merge_stderr=False, output_limit=1 << 20)
    except OSError as e:
        raise UsageError(f"password command failed: {e}") from None
    if r.code is None:
        if r.timed_out:
            raise UsageError(f"password command timed out after {timeout_s:g}s")
        raise Interrupted("stopped while the password command ran")
    if r.code != 0:
        raise UsageError(f"password command exited with status {r.code}")
    return r.out.rstrip(b"\r\n")


@dataclass
class PasswordSource:
    """Where a password comes from: the first of command, file, environment variable, value."""

    command: str | None = None
    file: str | None = None
    env: str | None = None
    value: bytes | None = None

    def empty(self) -> bool:
        return not (self.command or self.file or self.env or self.value is not None)

    def get(self, *, timeout_s: float | None = None, stop: threading.Event | None = None) -> bytes:
        if self.command:
            return run_password_command(self.command, timeout_s=timeout_s, stop=stop)
        if self.file:
            return read_password_file(self.file)
        if self.env:
            if self.env not in os.environ:
                raise UsageError(f"the password variable {self.env} is not set")
            return os.environ[self.env].encode()
        if self.value is not None:
            return self.value
        raise UsageError("no password source given")


@dataclass
class RepoSpec:
    url: str
    password: PasswordSource = field(default_factory=PasswordSource)
    options: dict[str, str] = field(default_factory=dict)  # backend options (s3.endpoint=...)
    cache_dir: Path | None = None
    lock_retry_s: float = 0.0


def probe(backend: Backend) -> None:
    """Fail before any password is asked when there is no repository or its format is newer.
    A missing or damaged config beside key files is let through: open uses a key file's copy."""
    try:
        split_config(backend.load("config"))
    except UnsupportedVersion:
        # ... unless a key file is of our version: then the clear header may be damaged, and
        # open decides with the key (docs/format.md §14.2)
        if readable_key_file(backend) is None:
            raise
    except (NotFound, FormatError) as e:
        if not any(True for _ in backend.list("keys/")):
            if isinstance(e, NotFound):
                raise RepositoryNotFound(f"there is no repository at {backend.location}") from None
            raise


def open_repository(spec: RepoSpec, *, password: Callable[[], bytes] | None = None) -> Repository:
    """Open the repository ``spec`` names (``password`` overrides its password source)."""
    backend = open_backend(spec.url, spec.options)
    probe(backend)
    pw = password() if password is not None else spec.password.get()
    repo = Repository.open(backend, pw, cache_dir=spec.cache_dir)
    if spec.lock_retry_s:
        repo.lock_retry_s = spec.lock_retry_s
    return repo
