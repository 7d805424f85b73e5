"""The local cache is private (issue 8): folders 0700 and files 0600 whatever the umask (an older
cache is fixed when opened), nothing in it names what was backed up (the directory cache is
sealed under a key derived from the repository's secrets), and a ``CACHEDIR.TAG`` at its root
makes ``--exclude-caches`` skip it."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.repository.cache import CACHEDIR_SIGNATURE, Cache
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli

SECRET_NAMES = ["topsecret-folder-7a1f", "payroll-2024-q3.xlsx", "diary-entry-d41d.txt"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    deep = src / SECRET_NAMES[0] / "inner"
    deep.mkdir(parents=True)
    (src / SECRET_NAMES[0] / SECRET_NAMES[1]).write_bytes(b"salaries" * 1000)
    (deep / SECRET_NAMES[2]).write_bytes(b"dear diary")
    return src


def _summary(out: str) -> dict[str, object]:
    for line in out.splitlines():
        obj = json.loads(line)
        if obj.get("type") == "summary":
            return dict(obj)
    raise AssertionError(f"no summary in {out!r}")


def _everything(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    yield root, os.lstat(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            yield p, os.lstat(p)


def _assert_private(root: Path) -> int:
    files = 0
    for p, st in _everything(root):
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            assert mode == 0o700, f"{p}: folder mode {mode:o}"
        elif stat.S_ISREG(st.st_mode):
            files += 1
            assert mode & 0o077 == 0, f"{p}: file mode {mode:o}"
    return files


def _assert_tagged(root: Path) -> None:
    tag = root / "CACHEDIR.TAG"
    assert tag.read_bytes().startswith(CACHEDIR_SIGNATURE + b"\n")
    assert stat.S_IMODE(tag.stat().st_mode) & 0o077 == 0


def test_cache_is_private_and_names_nothing(cli: Cli, tmp_path: Path, umask_022: None) -> None:
    cache_root = Path(cli.env["SAFEHOLD_CACHE_DIR"])
    # a cache left by an older version: world-readable folders and files
    (cache_root / "old").mkdir(parents=True, mode=0o755)
    os.chmod(cache_root, 0o755)
    (cache_root / "old" / "leftover").write_bytes(b"x")
    os.chmod(cache_root / "old" / "leftover", 0o644)
    src = _source(tmp_path)
    cli.ok("init")
    first = _summary(cli.ok("backup", "--json", str(src)).out)
    second = _summary(cli.ok("backup", "--json", str(src)).out)
    assert first["dirs_unchanged"] == 0
    assert isinstance(second["dirs_unchanged"], int) and second["dirs_unchanged"] > 0, second
    cli.ok("snapshots")
    cli.ok("restore", "latest", "--target", str(tmp_path / "restored"))

    assert _assert_private(cache_root) >= 4
    _assert_tagged(cache_root)
    dircaches = list(cache_root.rglob("dirs.msgpack"))
    assert len(dircaches) == 1  # the directory cache was written (sealed)
    needles = [n.encode() for n in SECRET_NAMES] + [os.fsencode(str(src))]
    for p, st in _everything(cache_root):
        assert not any(n.decode() in p.name for n in needles), p
        if stat.S_ISREG(st.st_mode):
            data = p.read_bytes()
            found = [n for n in needles if n in data]
            assert not found, f"{p} holds {found}"


def test_damaged_directory_cache_is_ignored_and_rebuilt(cli: Cli, tmp_path: Path) -> None:
    src = _source(tmp_path)
    cli.ok("init")
    cli.ok("backup", str(src))
    [dircache] = list(Path(cli.env["SAFEHOLD_CACHE_DIR"]).rglob("dirs.msgpack"))
    data = bytearray(dircache.read_bytes())
    data[len(data) // 2] ^= 0x10
    dircache.write_bytes(bytes(data))
    again = _summary(cli.ok("backup", "--json", str(src)).out)
    assert again["dirs_unchanged"] == 0 and again["warnings"] == 0, again
    rebuilt = _summary(cli.ok("backup", "--json", str(src)).out)
    assert isinstance(rebuilt["dirs_unchanged"], int) and rebuilt["dirs_unchanged"] > 0


def _snapshot_paths(cli: Cli) -> set[str]:
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        snap = repo.find_snapshot("latest")
        out: set[str] = set()
        stack = [("", snap.tree)]
        while stack:
            prefix, tid = stack.pop()
            for node in repo.read_tree(tid):
                path = f"{prefix}/{os.fsdecode(node.name)}"
                out.add(path)
                if node.subtree is not None:
                    stack.append((path, node.subtree))
        return out
    finally:
        repo.close()


def test_exclude_caches_skips_the_cache(cli: Cli, tmp_path: Path) -> None:
    home = Path(cli.env["HOME"])
    (home / "documents").mkdir()
    (home / "documents" / "letter.txt").write_bytes(b"hello")
    cli.ok("init")
    cli.ok("backup", str(tmp_path / "home" / "documents"))  # fills the cache
    cache_root = Path(cli.env["SAFEHOLD_CACHE_DIR"])
    assert cache_root.parent == home
    assert any(p.name == "dirs.msgpack" for p, _ in _everything(cache_root))

    cli.ok("backup", str(home))
    with_cache = _snapshot_paths(cli)
    assert f"{cache_root}/CACHEDIR.TAG" in with_cache
    assert any(p.startswith(f"{cache_root}/") and "CACHEDIR.TAG" not in p for p in with_cache)

    cli.ok("backup", "--exclude-caches", str(home))
    without = _snapshot_paths(cli)
    assert f"{home}/documents/letter.txt" in without
    inside = {p for p in without if p.startswith(f"{cache_root}/")}
    assert inside == {f"{cache_root}/CACHEDIR.TAG"}, sorted(inside)[:5]


@pytest.mark.parametrize("where", ["xdg", "home"])
def test_default_cache_roots_are_private(
    cli: Cli, tmp_path: Path, umask_022: None, where: str
) -> None:
    home = Path(cli.env["HOME"])
    del cli.env["SAFEHOLD_CACHE_DIR"]
    cli.env.pop("XDG_CACHE_HOME", None)
    if where == "xdg":
        cli.env["XDG_CACHE_HOME"] = str(home / "xdg")
        root = home / "xdg" / "safehold"
    else:
        root = home / ".cache" / "safehold"
    src = _source(tmp_path)
    cli.ok("init")
    cli.ok("backup", str(src))
    assert _assert_private(root) >= 3
    _assert_tagged(root)


# --- Cache.put_private / get_private ---------------------------------------------------------


def test_private_entries_are_sealed(tmp_path: Path, umask_022: None) -> None:
    key = bytes(range(32))
    cache = Cache(tmp_path / "c" / "repo", key=key)
    plain = b"/home/alice/" + SECRET_NAMES[1].encode()
    cache.put_private("dirs.msgpack", plain)
    path = tmp_path / "c" / "repo" / "dirs.msgpack"
    sealed = path.read_bytes()
    assert plain not in sealed and b"alice" not in sealed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (tmp_path / "c", tmp_path / "c" / "repo"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert cache.get_private("dirs.msgpack") == plain
    cache.put_private("dirs.msgpack", plain)
    assert path.read_bytes() != sealed  # a fresh nonce every time
    assert cache.get_private("dirs.msgpack") == plain

    # a copy renamed to another entry does not open (the name is authenticated)
    (tmp_path / "c" / "repo" / "other").write_bytes(path.read_bytes())
    assert cache.get_private("other") is None
    # another repository's key does not open it: it is dropped, to be rebuilt
    assert Cache(tmp_path / "c" / "repo", key=bytes(32)).get_private("dirs.msgpack") is None
    assert not path.exists()
    # a flipped byte, or plaintext left by an older version, is dropped too
    cache.put_private("dirs.msgpack", plain)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert cache.get_private("dirs.msgpack") is None
    path.write_bytes(plain)
    assert cache.get_private("dirs.msgpack") is None

    # without a key nothing private is kept
    keyless = Cache(tmp_path / "c" / "nokey")
    keyless.put_private("dirs.msgpack", plain)
    assert keyless.get_private("dirs.msgpack") is None
    assert not (tmp_path / "c" / "nokey" / "dirs.msgpack").exists()
    with pytest.raises(ValueError):
        Cache(tmp_path / "c" / "bad", key=b"short")


def test_opening_fixes_an_old_public_cache(tmp_path: Path) -> None:
    root = tmp_path / "repo-cache"
    (root / "snapshots").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "snapshots", 0o775)
    (root / "snapshots" / "abc").write_bytes(b"x")
    os.chmod(root / "snapshots" / "abc", 0o664)
    Cache(root, key=bytes(32))
    assert _assert_private(root) == 2  # the snapshot copy and CACHEDIR.TAG
