"""LocalBackend: atomic writes, error mapping, name hygiene, permissions, a full disk."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from safehold.backends import LocalBackend
from safehold.backends.base import clean_temporaries
from safehold.errors import NotFound, PermanentError, TransientError

NOBODY = 65534


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def backend(root: Path) -> LocalBackend:
    b = LocalBackend(root)
    b.create()
    return b


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


# --- atomic store --------------------------------------------------------------------------------


def failing(exc: BaseException) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


@pytest.mark.parametrize(
    ("function", "exc", "expected"),
    [
        ("fsync", OSError(errno.EIO, "Input/output error"), TransientError),
        ("link", OSError(errno.EIO, "Input/output error"), TransientError),
        ("write", OSError(errno.EIO, "Input/output error"), TransientError),
        ("write", KeyboardInterrupt(), KeyboardInterrupt),
        ("link", KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_failed_store_leaves_neither_final_nor_temporary_file(
    backend: LocalBackend,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    exc: BaseException,
    expected: type[BaseException],
) -> None:
    backend.store("data/ab/existing", b"old")
    monkeypatch.setattr(os, function, failing(exc))
    with pytest.raises(expected):
        backend.store("data/ab/new", os.urandom(100_000))
    monkeypatch.undo()
    assert files_under(root) == ["data/ab/existing"]
    with pytest.raises(NotFound):
        backend.stat("data/ab/new")


def test_overwrite_failure_keeps_the_old_version(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.store("locks/l", b"old version", overwrite=True)
    monkeypatch.setattr(os, "replace", failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(TransientError):
        backend.store("locks/l", b"new version", overwrite=True)
    monkeypatch.undo()
    assert backend.load("locks/l") == b"old version"
    assert files_under(root) == ["locks/l"]


def test_store_fsyncs_the_file_and_the_folder(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file was synced")
    monkeypatch.setattr(os, "fsync", fsync)
    backend.store("data/ab/x", b"payload")
    folder = str(root / "data" / "ab")
    # the new folders' parents, the temporary file (renamed by now), then the folder itself
    assert synced[:2] == [str(root), str(root / "data")]
    assert os.path.basename(synced[2]).startswith(".tmp-")
    assert synced[3:] == [folder]
    synced.clear()
    backend.store("data/ab/y", b"payload")
    assert len(synced) == 2 and synced[1] == folder
    synced.clear()
    backend.delete("data/ab/y")
    assert synced == [folder]


def test_listing_skips_temporary_files(backend: LocalBackend, root: Path) -> None:
    backend.store("data/ab/x", b"x")
    (root / "data" / "ab" / ".tmp-0123456789abcdef").write_bytes(b"half written")
    assert [i.name for i in backend.list("")] == ["data/ab/x"]
    with pytest.raises(ValueError):
        backend.store("data/ab/.tmp-0123456789abcdef", b"x")


def test_without_hard_links_falls_back_to_rename(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def no_link(src: str, dst: str) -> None:
        calls.append(dst)
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    backend.store("data/ab/x", b"first")
    backend.store("data/ab/x", b"first")  # same content: fine
    with pytest.raises(Exception, match="already exists") as info:
        backend.store("data/ab/x", b"other")
    assert type(info.value).__name__ == "AlreadyExists"
    backend.store("data/ab/y", b"second")
    assert len(calls) == 1  # found out once, then no more attempts
    assert backend.load("data/ab/x") == b"first"
    assert files_under(root) == ["data/ab/x", "data/ab/y"]


# --- temporaries of interrupted stores -----------------------------------------------------------

HOUR = 3600.0

# A store in a child process that SIGKILLs itself once the temporary is written and synced,
# just before it would get its final name: what a crash or power cut leaves behind.
KILLED_STORE = textwrap.dedent(
    """
    import os, signal, sys
    from safehold.backends.local import LocalBackend

    def crash(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    os.link = os.rename = os.replace = crash
    LocalBackend(sys.argv[1]).store(sys.argv[2], b"payload" * 1000)
    """
)


def make_old(path: Path, age_s: float) -> None:
    when = time.time() - age_s
    os.utime(path, (when, when), follow_symlinks=False)


def test_temporary_of_a_killed_store_is_cleaned_once_old(backend: LocalBackend, root: Path) -> None:
    backend.store("data/ab/kept", b"kept")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_STORE, str(root), "data/ab/lost"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = [name for name in files_under(root) if name != "data/ab/kept"]
    assert len(left) == 1 and left[0].startswith("data/ab/.tmp-"), left
    assert (root / left[0]).read_bytes() == b"payload" * 1000
    assert [i.name for i in backend.list("")] == ["data/ab/kept"]
    # young: it could be another client's store under way
    assert backend.clean_temporaries(HOUR) == []
    assert clean_temporaries(backend, HOUR) == []
    make_old(root / left[0], 2 * HOUR)
    assert clean_temporaries(backend, HOUR) == left
    assert files_under(root) == ["data/ab/kept"]
    backend.store("data/ab/lost", b"payload" * 1000)  # the store, done again, works
    assert sorted(i.name for i in backend.list("")) == ["data/ab/kept", "data/ab/lost"]


def test_clean_temporaries_leaves_links_folders_and_other_files(
    backend: LocalBackend, root: Path
) -> None:
    backend.store("data/ab/object", b"object")
    backend.store("data/.tmp-folder/object", b"in a folder named like a temporary")
    folder = root / "data" / "ab"
    (folder / ".tmp-link").symlink_to(folder / "object")
    (folder / ".tmp-dangling").symlink_to(folder / "nowhere")
    (folder / "foreign.tmp-file").write_bytes(b"not ours")
    os.mkfifo(folder / ".tmp-fifo")
    (folder / ".tmp-0123456789abcdef").write_bytes(b"half written")
    for path in [*root.rglob("*"), root]:
        make_old(path, 2 * HOUR)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert backend.clean_temporaries(HOUR) == ["data/ab/.tmp-0123456789abcdef"]
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert after == [p for p in before if p != "data/ab/.tmp-0123456789abcdef"]
    assert backend.load("data/ab/object") == b"object"
    assert backend.load("data/.tmp-folder/object") == b"in a folder named like a temporary"


def test_clean_temporaries_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert LocalBackend(tmp_path / "nothing-here").clean_temporaries(0) == []


def test_clean_temporaries_errors_are_mapped(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "data").mkdir()
    tmp = root / "data" / ".tmp-0123456789abcdef"
    tmp.write_bytes(b"half written")
    make_old(tmp, 2 * HOUR)
    monkeypatch.setattr(os, "unlink", failing(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermanentError, match=f"permission denied: {re.escape(str(tmp))}$"):
        backend.clean_temporaries(HOUR)
    monkeypatch.setattr(os, "unlink", failing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(TransientError, match=re.escape(f"cannot remove {tmp}: Input/output")):
        backend.clean_temporaries(HOUR)
    monkeypatch.setattr(os, "unlink", failing(FileNotFoundError(errno.ENOENT, "gone")))
    assert backend.clean_temporaries(HOUR) == []  # published or removed meanwhile: not ours
    monkeypatch.undo()
    assert tmp.exists()
    assert backend.clean_temporaries(HOUR) == ["data/.tmp-0123456789abcdef"]


def test_store_whose_temporary_is_cleaned_after_linking_succeeds(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def link_then_lose_the_temporary(src: str, dst: str) -> None:
        real_link(src, dst)
        os.unlink(src)  # a clean_temporaries with a limit shorter than this store took

    monkeypatch.setattr(os, "link", link_then_lose_the_temporary)
    backend.store("data/ab/x", b"payload")
    monkeypatch.undo()
    assert backend.load("data/ab/x") == b"payload"
    assert files_under(root) == ["data/ab/x"]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected", "text"),
    [
        (errno.ENOSPC, PermanentError, "disk full while writing data/ab/x in "),
        (errno.EDQUOT, PermanentError, "disk quota exceeded while writing data/ab/x in "),
        (errno.EACCES, PermanentError, "permission denied: "),
        (errno.EPERM, PermanentError, "permission denied: "),
        (errno.EROFS, PermanentError, "read-only file system: "),
        (errno.ENAMETOOLONG, PermanentError, "cannot store "),
        (errno.EIO, TransientError, "cannot store "),
        (errno.EAGAIN, TransientError, "cannot store "),
        (errno.ETIMEDOUT, TransientError, "cannot store "),
        (errno.ESTALE, TransientError, "cannot store "),
    ],
)
def test_os_errors_map_to_one_line_backend_errors(
    backend: LocalBackend,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    expected: type[Exception],
    text: str,
) -> None:
    backend.store("data/ab/other", b"o")
    monkeypatch.setattr(os, "write", failing(OSError(code, os.strerror(code))))
    with pytest.raises(expected) as info:
        backend.store("data/ab/x", b"payload")
    message = str(info.value)
    assert message.startswith(text)
    assert "\n" not in message
    assert str(root) in message
    assert type(info.value) is expected
    monkeypatch.undo()
    assert files_under(root) == ["data/ab/other"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOENT, NotFound),
        (errno.EACCES, PermanentError),
        (errno.EIO, TransientError),
        (errno.ETIMEDOUT, TransientError),
    ],
)
def test_load_errors_are_mapped(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[Exception]
) -> None:
    backend.store("data/x", b"x")
    monkeypatch.setattr(os, "pread", failing(OSError(code, os.strerror(code))))
    with pytest.raises(expected) as info:
        backend.load("data/x")
    assert type(info.value) is expected
    assert "data" in str(info.value) and "\n" not in str(info.value)


def test_listing_error_raises_instead_of_skipping(
    backend: LocalBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.store("data/aa/x", b"x")
    backend.store("data/bb/y", b"y")
    real_scandir = os.scandir
    broken = str(root / "data" / "bb")

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == broken:
            raise OSError(errno.EIO, "Input/output error", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(TransientError, match="bb"):
        list(backend.list("data/"))
    monkeypatch.setattr(os, "scandir", failing(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermanentError, match="permission denied"):
        list(backend.list("data/"))


def test_disk_full_for_real_on_a_tiny_tmpfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_os_errors_map_* covers ENOSPC")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command; test_os_errors_map_* covers ENOSPC")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.strip()})")
    try:
        root = mnt / "repo"
        backend = LocalBackend(root)
        backend.create()
        backend.store("config", b"c" * 1000)  # something fits
        with pytest.raises(PermanentError) as info:
            backend.store("data/ab/big", os.urandom(256 * 1024))
        message = str(info.value)
        assert message == f"disk full while writing data/ab/big in {root}"
        assert files_under(root) == ["config"]  # no partial object, no temporary file
        assert backend.load("config") == b"c" * 1000
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- permissions ---------------------------------------------------------------------------------


def as_unprivileged(check: Callable[[], dict[str, str]]) -> dict[str, str]:
    """Run ``check`` where file permissions apply: here, or in a child that dropped root.

    As root, chmod does not deny anything, so the check runs in a forked child that switched
    to user ``nobody`` (a subprocess like ``runuser -u nobody``, but without needing a Python
    interpreter that user may execute). Returns what ``check`` returned.
    """
    if os.geteuid() != 0:
        return check()
    if not hasattr(os, "fork"):
        pytest.skip("running as root without os.fork: cannot drop privileges for the check")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = json.dumps(check()).encode()
            status = 0
        except BaseException as e:
            payload = json.dumps({"child error": f"{type(e).__name__}: {e}"}).encode()
        try:
            os.write(write_end, payload)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        payload = f.read()
    _, wait_status = os.waitpid(pid, 0)
    result: dict[str, str] = json.loads(payload)
    assert os.waitstatus_to_exitcode(wait_status) == 0, result
    return result


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder user ``nobody`` can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="safehold-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(path)


def test_permission_denied_is_permanent(shared_dir: Path) -> None:
    root = shared_dir / "repo"
    backend = LocalBackend(root)
    backend.create()
    backend.store("config", b"c")
    backend.store("data/ab/x", b"x")
    if os.geteuid() == 0:
        for p in [root, *root.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
    readonly_parent = shared_dir / "locked"
    readonly_parent.mkdir()
    readonly_parent.chmod(0o555)  # root may still write here, but the check does not run as root

    def check() -> dict[str, str]:
        results = {"control store": outcome(lambda: backend.store("data/ab/y", b"y"))}
        os.chmod(root / "data" / "ab", 0o000)
        results["store"] = outcome(lambda: backend.store("data/ab/z", b"z"))
        results["load"] = outcome(lambda: backend.load("data/ab/x"))
        results["stat"] = outcome(lambda: backend.stat("data/ab/x"))
        results["list"] = outcome(lambda: list(backend.list("data/")))
        os.chmod(root / "data" / "ab", 0o755)
        os.chmod(root / "config", 0o000)
        results["load file"] = outcome(lambda: backend.load("config"))
        os.chmod(root / "config", 0o644)
        results["create"] = outcome(LocalBackend(readonly_parent / "repo").create)
        return results

    results = as_unprivileged(check)
    ab = root / "data" / "ab"
    assert results == {
        "control store": "ok",
        "store": f"PermanentError: permission denied: {ab / 'z'}",
        "load": f"PermanentError: permission denied: {ab / 'x'}",
        "stat": f"PermanentError: permission denied: {ab / 'x'}",
        "list": f"PermanentError: permission denied: {ab}",
        "load file": f"PermanentError: permission denied: {root / 'config'}",
        "create": f"PermanentError: cannot create {readonly_parent / 'repo'}: Permission denied",
    }


# --- names and the root folder -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../x", "data/../../x", "/tmp/x", "..\\x"])
def test_names_cannot_escape_the_root(backend: LocalBackend, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        backend.store(name, b"escaped")
    assert files_under(tmp_path) == []


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = LocalBackend("rel/repo")
    assert backend.location == str(tmp_path / "rel" / "repo")
    backend.create()
    backend.store("config", b"c")
    monkeypatch.chdir("/")
    assert backend.load("config") == b"c"  # the root does not follow the working folder


def test_missing_root(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "nothing" / "here")
    with pytest.raises(NotFound):
        backend.load("config")
    with pytest.raises(NotFound):
        backend.stat("config")
    assert list(backend.list("")) == []
    with pytest.raises(PermanentError, match="does not exist"):
        backend.store("data/ab/x", b"x")
    assert not (tmp_path / "nothing").exists()  # store does not invent a repository


def test_create_makes_parents_and_fails_on_a_file(tmp_path: Path) -> None:
    LocalBackend(tmp_path / "a" / "b" / "c").create()
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(PermanentError, match=r"cannot create .*file: it exists and is not a"):
        LocalBackend(tmp_path / "file").create()
    with pytest.raises(PermanentError, match="cannot create"):
        LocalBackend(tmp_path / "file" / "sub").create()


def test_store_under_an_object_is_permanent(backend: LocalBackend) -> None:
    backend.store("config", b"c")
    with pytest.raises(PermanentError):
        backend.store("config/x", b"x")
    with pytest.raises(NotFound):
        backend.load("config/x")


def test_store_of_a_big_object_round_trips(backend: LocalBackend, root: Path) -> None:
    data = os.urandom(16 << 20)
    backend.store("data/ab/pack", memoryview(data))
    assert (root / "data" / "ab" / "pack").read_bytes() == data
    assert backend.load("data/ab/pack", (16 << 20) - 10) == data[-10:]
    assert (root / "data" / "ab" / "pack").stat().st_mode & 0o777 == 0o600
