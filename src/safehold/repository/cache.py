"""A local cache of immutable objects (index, snapshots, tree packs), keyed by storage id.

The repository stays the source of truth: every cached object is verified against its storage id
when read, and deleting the cache changes nothing but speed.

The cache is private: its folders are created mode 0700 and its files 0600 whatever the umask
(and a cache made by an older version is fixed when opened), and what the repository keeps
encrypted is never kept here in plaintext: objects copied from the repository are encrypted
already, and what the cache holds of its own (the directory cache, damage records) is sealed
with AES-256-GCM under :attr:`Cache.key` (:meth:`Cache.put_private`). A ``CACHEDIR.TAG`` marks
the cache root, so that backups with ``--exclude-caches`` leave it out.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

from safehold import crypto
from safehold.errors import IntegrityError
from safehold.ids import storage_id

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
CACHEDIR_TAG_CONTENT = (
    CACHEDIR_SIGNATURE + b"\n"
    b"# This file is a cache directory tag created by safehold.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)
DIR_MODE = 0o700
FILE_MODE = 0o600
_PRIVATE_MAGIC = b"safehold-private-1\n"
_NONCE_LEN = 12


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents mode 0700 (whatever the umask); an existing
    ``path`` with group or other permission bits is made 0700. OSError if it cannot be made."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, DIR_MODE)
        os.chmod(d, DIR_MODE)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700 | DIR_MODE)


def write_private_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` in a file of mode 0600 (OSError on failure)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_private_tree(root: Path) -> None:
    """Remove group and other permission bits from every folder and file under ``root``."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))
                if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
                    continue
                os.chmod(entry.path, stat.S_IMODE(st.st_mode) & 0o700)
            except OSError:
                continue


def prepare_cache_root(root: Path) -> None:
    """Make ``root`` a private cache folder marked with a ``CACHEDIR.TAG``; a root that had
    group or other permission bits (made by an older version) is fixed with everything in it.
    Best effort: a cache that cannot be prepared is only not used for writing."""
    try:
        fix = root.exists() and bool(stat.S_IMODE(os.stat(root).st_mode) & 0o077)
        private_dir(root)
        if fix:
            make_private_tree(root)
        tag = root / CACHEDIR_TAG
        try:
            with open(tag, "rb") as f:
                ok = f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
            if stat.S_IMODE(os.stat(tag).st_mode) & 0o077:
                os.chmod(tag, FILE_MODE)
        except FileNotFoundError:
            ok = False
        if not ok:
            write_private_file(tag, CACHEDIR_TAG_CONTENT)
    except OSError:
        pass


class Cache:
    """``root``: the folder of one repository's cache. ``key``: 32 bytes sealing what the cache
    keeps of its own (:meth:`put_private`); without it nothing private is kept."""

    def __init__(self, root: Path, *, key: bytes | None = None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("the cache key must be 32 bytes")
        self.root = root
        self.key = key
        prepare_cache_root(root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str, expected_id: str) -> bytes | None:
        """The cached object, or None if missing or not matching its id (then it is dropped)."""
        path = self._path(name)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if storage_id(data) != expected_id:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        """Part of a cached object, unverified: for blobs, which are authenticated on their own."""
        try:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError:
            return None
        return data if len(data) == length else None

    def drop(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._path(name).unlink()

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            private_dir(path.parent)
            write_private_file(path, data)
        except OSError:
            pass  # a cache that cannot be written only costs speed

    def put_private(self, name: str, data: bytes) -> None:
        """Keep ``data`` under ``name``, sealed (AES-256-GCM under :attr:`key`, a random nonce,
        the name authenticated with it). Without a key nothing is kept."""
        if self.key is None:
            return
        nonce = os.urandom(_NONCE_LEN)
        sealed = crypto.encrypt(self.key, nonce, data, _PRIVATE_MAGIC + name.encode())
        self.put(name, _PRIVATE_MAGIC + nonce + sealed)

    def get_private(self, name: str) -> bytes | None:
        """What :meth:`put_private` kept under ``name``, or None when it is missing or does not
        open under :attr:`key` (damaged, from another key, or plaintext of an older version:
        then it is dropped and rebuilt by its owner)."""
        if self.key is None:
            return None
        try:
            raw = self._path(name).read_bytes()
        except OSError:
            return None
        head = len(_PRIVATE_MAGIC)
        if raw[:head] == _PRIVATE_MAGIC and len(raw) >= head + _NONCE_LEN + 16:
            try:
                return crypto.decrypt(
                    self.key,
                    raw[head : head + _NONCE_LEN],
                    raw[head + _NONCE_LEN :],
                    _PRIVATE_MAGIC + name.encode(),
                )
            except IntegrityError:
                pass
        self.drop(name)
        return None

    def forget_missing(self, prefix: str, keep: set[str]) -> None:
        """Drop cached objects under ``prefix`` whose ids are no longer in the repository."""
        folder = self._path(prefix)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.is_file() and entry.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
