"""A repository in a local (or locally mounted) folder.

Each object is a file under the root folder; the ``/`` in its name maps to sub-folders, made on
demand. A store writes a temporary file (named ``.tmp-…``) in the target folder, fsyncs it, then
hard-links it to its final name, which creates the name atomically only if it is absent; the
folder is fsynced afterwards, so a stored object survives a crash.

A store cut short by a crash leaves its temporary file behind (listings skip it);
:meth:`LocalBackend.clean_temporaries` removes those older than a given age.
"""

from __future__ import annotations

import builtins
import errno
import os
import stat as stat_module
import time
from collections.abc import Iterator

from safehold.backends.base import ObjectInfo, check_older_than
from safehold.errors import (
    AlreadyExists,
    BackendError,
    NotFound,
    PermanentError,
    TransientError,
)

TMP_PREFIX = ".tmp-"
"""Temporary files start with this; listings skip them and object names may not use it."""

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_COMPARE_CHUNK = 1 << 20

_EDQUOT = getattr(errno, "EDQUOT", None)
_NOT_FOUND = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
_NO_HARDLINKS = frozenset(
    code
    for code in (
        errno.EPERM,
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "EOPNOTSUPP", None),
        errno.EMLINK,
        errno.EXDEV,
    )
    if code is not None
)
# Failures that retrying cannot fix. Anything not named here or below counts as transient.
_PERMANENT = frozenset(
    code
    for code in (
        errno.EINVAL,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EFBIG,
        errno.EMLINK,
        errno.EXDEV,
        errno.EEXIST,
        errno.ENOSYS,
        errno.EBADF,
        errno.EFAULT,
        errno.ENXIO,
        errno.ENODEV,
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "EOPNOTSUPP", None),
    )
    if code is not None
)


def _bad_chars(text: str) -> bool:
    return "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def check_name(name: str) -> str:
    """Return ``name`` if it is a well-formed object name, else raise :class:`ValueError`.

    A name is relative, ``/``-separated, with no empty, ``.`` or ``..`` component, no backslash,
    NUL or other control character, and no final component starting with ``.tmp-``.
    """
    if not isinstance(name, str):
        raise ValueError(f"object name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("empty object name")
    if _bad_chars(name):
        raise ValueError(f"object name {name!r} contains a backslash or control character")
    if name.startswith("/"):
        raise ValueError(f"object name {name!r} is absolute")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"object name {name!r} has an empty, '.' or '..' component")
    if parts[-1].startswith(TMP_PREFIX):
        raise ValueError(f"object name {name!r} uses the reserved prefix {TMP_PREFIX!r}")
    return name


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a well-formed listing prefix, else raise :class:`ValueError`.

    ``""`` lists everything. Like a name, but the last component may be empty (``"data/"``) or
    partial (``"data/a"``).
    """
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix:
        return prefix
    if _bad_chars(prefix):
        raise ValueError(f"prefix {prefix!r} contains a backslash or control character")
    if prefix.startswith("/"):
        raise ValueError(f"prefix {prefix!r} is absolute")
    parts = prefix.split("/")
    for part in parts[:-1]:
        if part in ("", ".", ".."):
            raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' component")
    if parts[-1] in (".", ".."):
        raise ValueError(f"prefix {prefix!r} has a '.' or '..' component")
    return prefix


def check_range(offset: int, length: int | None) -> None:
    """Raise :class:`ValueError` for a negative offset or length."""
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    if length is not None and length < 0:
        raise ValueError(f"negative length {length}")


def byte_view(data: bytes | memoryview) -> memoryview:
    """A flat, byte-format view of ``data`` (no copy)."""
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems (and all of Windows) cannot fsync a folder; nothing more to do.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(fd)


class LocalBackend:
    """Objects stored as files under ``root``."""

    consistent_listing = (
        True  # one file system: a listing shows every object stored before it began
    )

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.path.abspath(os.fspath(root))
        self._hardlinks = True

    def __repr__(self) -> str:
        return f"LocalBackend({self._root!r})"

    @property
    def location(self) -> str:
        return self._root

    # --- helpers -------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self._root, *check_name(name).split("/"))

    def _error(self, e: OSError, op: str, name: str, path: str) -> BackendError:
        """The safehold error for an OSError raised while doing ``op`` on ``name`` at ``path``."""
        code = e.errno
        reason = (e.strerror or (os.strerror(code) if code else str(e))).replace("\n", " ")
        if op in ("load", "stat", "delete") and code in _NOT_FOUND:
            return NotFound(f"{name} not found in {self._root}")
        if code == errno.ENOSPC:
            return PermanentError(f"disk full while writing {name} in {self._root}")
        if code is not None and code == _EDQUOT:
            return PermanentError(f"disk quota exceeded while writing {name} in {self._root}")
        if code in (errno.EACCES, errno.EPERM):
            return PermanentError(f"permission denied: {path}")
        if code == errno.EROFS:
            return PermanentError(f"read-only file system: {path}")
        if code in _PERMANENT:
            return PermanentError(f"cannot {op} {path}: {reason}")
        return TransientError(f"cannot {op} {path}: {reason}")

    def _make_dirs(self, name: str) -> None:
        """Create the folders of ``name`` below the root; fsync each parent that gained one."""
        if not os.path.isdir(self._root):
            raise PermanentError(f"repository folder {self._root} does not exist")
        rel_parts = name.split("/")[:-1]
        current = self._root
        for part in rel_parts:
            parent, current = current, os.path.join(current, part)
            try:
                os.mkdir(current, _DIR_MODE)
            except FileExistsError:
                continue
            _fsync_dir(parent)

    def _open_tmp(self, name: str, directory: str) -> tuple[int, str]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        made_dirs = False
        while True:
            tmp = os.path.join(directory, TMP_PREFIX + os.urandom(8).hex())
            try:
                return os.open(tmp, flags, _FILE_MODE), tmp
            except FileExistsError:
                continue
            except FileNotFoundError:
                if made_dirs:
                    raise
                self._make_dirs(name)
                made_dirs = True

    @staticmethod
    def _write_all(fd: int, view: memoryview) -> None:
        total = len(view)
        done = 0
        while done < total:
            written = os.write(fd, view[done:])
            if written <= 0:  # pragma: no cover - a regular file never does this
                raise OSError(errno.EIO, "write returned no progress")
            done += written

    @staticmethod
    def _same_content(path: str, view: memoryview) -> bool:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat_module.S_ISREG(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
            if info.st_size != len(view):
                return False
            pos = 0
            while True:
                chunk = f.read(_COMPARE_CHUNK)
                if not chunk:
                    return pos == len(view)
                if view[pos : pos + len(chunk)] != chunk:
                    return False
                pos += len(chunk)

    def _publish(self, name: str, tmp: str, path: str, view: memoryview) -> bool:
        """Give the fully written ``tmp`` its final name if that name is free (or same content).

        Returns whether ``tmp`` was renamed (rather than linked, leaving it to be removed).
        """
        for _ in range(5):
            if self._hardlinks:
                try:
                    os.link(tmp, path)
                    return False
                except FileExistsError:
                    pass
                except OSError as e:
                    if e.errno not in _NO_HARDLINKS:
                        raise
                    # No hard links here (FAT, some FUSE or network file systems): fall back
                    # to check-then-rename, which is atomic for readers but can race with a
                    # concurrent store of the same name (harmless for content-addressed names).
                    self._hardlinks = False
                    continue
            elif not os.path.lexists(path):
                os.rename(tmp, path)
                return True
            try:
                same = self._same_content(path, view)
            except FileNotFoundError:
                continue  # deleted meanwhile: try again
            if same:
                return False
            raise AlreadyExists(f"{name} already exists in {self._root} with different content")
        raise TransientError(f"cannot store {path}: it keeps appearing and disappearing")

    # --- the Backend protocol ------------------------------------------------------------------

    def create(self) -> None:
        try:
            os.makedirs(self._root, mode=_DIR_MODE, exist_ok=True)
        except OSError as e:
            reason = e.strerror or str(e)
            if isinstance(e, FileExistsError):
                reason = "it exists and is not a folder"
            raise PermanentError(f"cannot create {self._root}: {reason}") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._walk(prefix)

    def _walk(self, prefix: str) -> Iterator[ObjectInfo]:
        cut = prefix.rfind("/") + 1
        base, first_filter = prefix[:cut], prefix[cut:]
        # Each entry: (relative folder with trailing "/", required start of entry names).
        stack: list[tuple[str, str]] = [(base, first_filter)]
        while stack:
            rel_dir, start = stack.pop()
            dir_path = os.path.join(self._root, *rel_dir.split("/")[:-1])
            try:
                try:
                    entries = os.scandir(dir_path)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # no such prefix folder (or it vanished): nothing in it
                with entries:
                    for entry in entries:
                        if not entry.name.startswith(start):
                            continue
                        rel = rel_dir + entry.name
                        try:
                            if entry.is_dir():
                                stack.append((rel + "/", ""))
                                continue
                            if entry.name.startswith(TMP_PREFIX) or not entry.is_file():
                                continue
                            size = entry.stat().st_size
                        except FileNotFoundError:
                            continue  # deleted while we listed
                        yield ObjectInfo(rel, size)
            except OSError as e:
                raise self._error(e, "list", prefix, dir_path) from e

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        check_range(offset, length)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._error(e, "load", name, path) from e
        try:
            if length is None:
                length = max(os.fstat(fd).st_size - offset, 0)
            data = os.pread(fd, length, offset)
            if len(data) < length:  # pread may return less: read on until the end of the object
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            return data
        except OSError as e:
            raise self._error(e, "load", name, path) from e
        finally:
            os.close(fd)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        path = self._path(name)
        view = byte_view(data)
        directory = os.path.dirname(path)
        tmp: str | None = None
        fd: int | None = None
        try:
            fd, tmp = self._open_tmp(name, directory)
            self._write_all(fd, view)
            os.fsync(fd)
            os.close(fd)
            fd = None
            if overwrite:
                os.replace(tmp, path)
                tmp = None
            else:
                if not self._publish(name, tmp, path, view):
                    try:
                        os.unlink(tmp)
                    except FileNotFoundError:
                        pass  # removed by clean_temporaries: the object is stored all the same
                tmp = None
            _fsync_dir(directory)
        except OSError as e:
            raise self._error(e, "store", name, path) from e
        finally:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            if not stat_module.S_ISREG(os.stat(path).st_mode):
                raise NotFound(f"{name} not found in {self._root}")
            os.unlink(path)
            _fsync_dir(os.path.dirname(path))
        except OSError as e:
            raise self._error(e, "delete", name, path) from e

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        try:
            info = os.stat(path)
        except OSError as e:
            raise self._error(e, "stat", name, path) from e
        if not stat_module.S_ISREG(info.st_mode):
            raise NotFound(f"{name} not found in {self._root}")
        return ObjectInfo(name, info.st_size)

    def close(self) -> None:
        pass

    # --- beyond the protocol -------------------------------------------------------------------

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """Remove the temporary files (``.tmp-…``) of interrupted stores whose modification
        time is more than ``older_than_s`` seconds ago; their names relative to the root.

        See :class:`~safehold.backends.base.CleansTemporaries`. Only regular files (not
        symbolic links) are removed; folders are walked as listings walk them.
        """
        cutoff = time.time() - check_older_than(older_than_s)
        removed: builtins.list[str] = []
        stack = [""]  # relative folders, each with a trailing "/" (or "" for the root)
        while stack:
            rel_dir = stack.pop()
            dir_path = os.path.join(self._root, *rel_dir.split("/")[:-1])
            try:
                try:
                    entries = os.scandir(dir_path)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # no repository folder (or it vanished): nothing in it
                with entries:
                    for entry in entries:
                        rel = rel_dir + entry.name
                        try:
                            if entry.is_dir():
                                stack.append(rel + "/")
                                continue
                            if not entry.name.startswith(TMP_PREFIX):
                                continue
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                                continue  # young: its store may still be under way
                        except FileNotFoundError:
                            continue  # gone while we looked
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            continue  # published or removed meanwhile
                        except OSError as e:
                            raise self._error(e, "remove", rel, entry.path) from e
                        removed.append(rel)
            except OSError as e:
                raise self._error(e, "list", rel_dir, dir_path) from e
        return removed
