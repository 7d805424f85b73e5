"""Hostile tree node fields (issue 8, from an outside tester): a planted snapshot whose tree holds
a node with a numeric field outside its documented bounds (docs/format.md §10), or a file whose
size disagrees with its content.

* The tree parser refuses such a node with a format error naming the entry and the field, so
  ``check`` names the tree as damaged (exit 4).
* Restore loses only that entry: it is named, the other entries of the same directory restore
  identical, the exit code is 4, never an internal error.
* A size that disagrees with the blobs' raw lengths: check names the snapshot and the file;
  restore writes the content, sees the disagreement and does not put the file in place.
* A value the system refuses when restore sets metadata (an xattr name with a NUL byte) fails
  that entry only.

Snapshots are planted through the library (as anyone holding the key could), the commands run
through the CLI.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.errors import FormatError
from safehold.format.common import pack
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, salvage_tree, tree_from_bytes, tree_to_bytes
from safehold.ids import BlobType
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli

NOW = 1_700_000_000 * 10**9
GOOD = {b"a_good": b"first good file\n", b"z_good": b"last good file\n" * 100}


def _file(name: bytes, data: bytes, content: list[bytes], **kw: Any) -> Node:
    fields: dict[str, Any] = {
        "name": name,
        "type": "file",
        "mode": 0o100644,
        "mtime_ns": NOW,
        "ctime_ns": NOW,
        "size": len(data),
        "content": content,
    }
    fields.update(kw)
    return Node(**fields)


def plant(repo_path: Path, bad: dict[str, Any], *, name: bytes = b"big") -> str:
    """A snapshot whose root tree holds ``a_good``, the file ``name`` with the fields ``bad``
    and ``z_good``; its id."""
    repo = Repository.open(LocalBackend(repo_path), PASSWORD.encode(), cache_dir=None)
    try:
        s = repo.write_session()
        nodes = []
        for n, data in {**GOOD, name: b"pwned\n"}.items():
            bid, _ = s.add_blob(BlobType.DATA, data, Compression())
            nodes.append(_file(n, data, [bid], **(bad if n == name else {})))
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
        s.flush()
        counts = {"files_new": 3, "files_changed": 0, "files_unmodified": 0, "dirs": 0}
        snap = Snapshot(
            NOW, "evil", "evil", ["/evil"], tree, summary={**counts, "other_entries": 0}
        )
        return repo.save_snapshot(snap)
    finally:
        repo.close()


def digest(root: Path) -> dict[str, str]:
    """Every regular file below ``root`` by its relative path: its sha256."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _want(names: dict[bytes, bytes]) -> dict[str, str]:
    return {os.fsdecode(k): hashlib.sha256(v).hexdigest() for k, v in names.items()}


def assert_one_line_errors(err: str) -> None:
    assert "internal error" not in err and "Traceback" not in err, err
    for line in err.splitlines():
        assert line.startswith(("safehold", "warning", "not restored", "error")), line


# --- the parser --------------------------------------------------------------------------------

HOSTILE = [
    ({"uid": 2**40}, "uid"),
    ({"gid": 2**32}, "gid"),
    ({"mode": -1}, "mode"),
    ({"mode": 2**40}, "mode"),
    ({"mode": 0o170644}, "no known file type"),
    ({"mtime_ns": 2**63}, "mtime"),
    ({"ctime_ns": 2**64 - 1}, "ctime"),
    ({"atime_ns": 2**63}, "atime"),
    ({"size": -5}, "size"),
    ({"size": 2**63}, "size"),
    ({"dev": -1}, "dev"),
    ({"ino": -(2**63)}, "ino"),
    ({"nlink": -1}, "nlink"),
    ({"rdev": -7}, "rdev"),
]


def _raw_tree(bad: dict[str, Any]) -> bytes:
    nodes = [
        _file(b"a", b"", []),
        _file(b"b", b"", [], **bad),
        _file(b"c", b"", []),
    ]
    return tree_to_bytes(nodes)


@pytest.mark.parametrize(("bad", "field"), HOSTILE, ids=[str(b) for b, _ in HOSTILE])
def test_the_parser_refuses_a_field_outside_its_bounds(bad: dict[str, Any], field: str) -> None:
    data = _raw_tree(bad)
    with pytest.raises(FormatError, match=field) as e:
        tree_from_bytes(data)
    assert "b'b'" in str(e.value)  # names the entry
    nodes, errs = salvage_tree(data)
    assert [n.name for n in nodes] == [b"a", b"c"]
    assert [name for name, _ in errs] == [b"b"]


def test_the_parser_accepts_the_extremes_of_every_bound() -> None:
    nodes = [
        _file(b"a", b"", [], uid=2**32 - 1, gid=0, mtime_ns=-(2**63), ctime_ns=2**63 - 1),
        _file(b"b", b"", [], mode=0o7777, size=2**63 - 1, dev=2**64 - 1, ino=2**64 - 1),
        _file(b"c", b"", [], nlink=2**64 - 1, atime_ns=2**63 - 1, mode=0o177777 & ~0o070000),
        Node(name=b"d", type="chardev", mode=0o20666, rdev=2**64 - 1),
        Node(name=b"s", type="socket", mode=0o140777),
    ]
    assert tree_from_bytes(tree_to_bytes(nodes)) == nodes


def test_salvage_names_an_entry_without_a_readable_name_and_refuses_a_broken_tree() -> None:
    good = _file(b"a", b"", []).to_obj()
    data = pack({"v": 1, "nodes": [good, good | {"name": 5}, good | {"name": b"c", "uid": -1}]})
    nodes, errs = salvage_tree(data)
    assert [n.name for n in nodes] == [b"a"]
    assert [name for name, _ in errs] == [b"", b"c"]
    with pytest.raises(FormatError):
        salvage_tree(pack({"v": 1, "nodes": 7}))


# --- check and restore through the CLI ---------------------------------------------------------

CLI_CASES = [
    {"uid": 2**40},
    {"mode": -1},
    {"mode": 2**40},
    {"mtime_ns": 2**63},
    {"size": -5},
]


@pytest.mark.parametrize("bad", CLI_CASES, ids=[str(b) for b in CLI_CASES])
def test_a_hostile_field_costs_only_its_entry(
    cli: Cli, tmp_path: Path, bad: dict[str, Any]
) -> None:
    cli.ok("init")
    sid = plant(cli.repo, bad)
    field = next(iter(bad)).removesuffix("_ns")

    r = cli("check", "--read-data")
    assert r.code == 4, str(r)
    out = r.out + r.err
    assert "tree of / is unreadable" in out and f"b'big' has {field}" in out, str(r)
    assert_one_line_errors(r.err)

    target = tmp_path / "t"
    r = cli("restore", sid[:12], "--target", str(target))
    assert r.code == 4, str(r)
    assert_one_line_errors(r.err)
    assert "/big" in r.err and f"has {field}" in r.err, str(r)
    assert digest(target) == _want(GOOD)  # the others restored identical; no /big

    # ls names the bad entry and lists the others
    r = cli("ls", sid[:12])
    assert r.code == 4 and "/big" in r.err and f"has {field}" in r.err, str(r)
    assert "/a_good" in r.out and "/z_good" in r.out and "/big" not in r.out, str(r)
    assert_one_line_errors(r.err)

    # repair snapshots drops only the bad entry; its repaired copy restores the others and
    # check of the repaired copy is clean (the original's damage is known)
    r = cli("repair", "snapshots")
    assert r.code in (0, 1) and "big" in r.out + r.err, str(r)
    target2 = tmp_path / "t2"
    cli.ok("restore", "latest", "--target", str(target2))
    assert digest(target2) == _want(GOOD)
    cli.ok("check")


@pytest.mark.parametrize("size", [3, 100, 0])
def test_a_size_that_disagrees_with_the_content_is_damage(
    cli: Cli, tmp_path: Path, size: int
) -> None:
    cli.ok("init")
    sid = plant(cli.repo, {"size": size}, name=b"lie")

    r = cli("check")
    assert r.code == 4, str(r)
    assert f"snapshot {sid[:8]}: /lie: its size says {size}, its content holds 6" in r.out + r.err
    assert_one_line_errors(r.err)

    target = tmp_path / "t"
    r = cli("restore", sid[:12], "--target", str(target))
    assert r.code == 4, str(r)
    assert_one_line_errors(r.err)
    assert f"/lie: its size says {size}, its content holds 6" in r.err, str(r)
    assert digest(target) == _want(GOOD)  # /lie not put in place, no temporary file left
    assert sorted(os.listdir(target)) == ["a_good", "z_good"]


def test_an_honest_sparse_file_is_not_called_damaged(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(24 << 20)  # mostly holes, a hole at the end too
        f.seek(5 << 20)
        f.write(b"data in the middle" * 1000)
        f.seek(17 << 20)
        f.write(os.urandom(100_000))
    assert os.stat(sparse).st_blocks * 512 < os.stat(sparse).st_size  # really sparse
    (src / "plain.txt").write_bytes(b"plain\n" * 1000)
    cli.ok("init")
    cli.ok("backup", str(src))
    r = cli("check", "--read-data")
    assert r.code == 0 and "its size says" not in r.out + r.err, str(r)
    target = tmp_path / "t"
    cli.ok("restore", "latest", "--target", str(target))
    restored = target / str(src).lstrip("/")
    assert digest(restored) == digest(src)
    assert os.stat(restored / "sparse.img").st_size == 24 << 20


def test_metadata_the_system_refuses_fails_only_its_entry(cli: Cli, tmp_path: Path) -> None:
    """An xattr name holding a NUL byte passes the parser (xattrs are free-form bytes) but no
    system call takes it: the file, and the directory holding it, are named; everything else
    restores."""
    cli.ok("init")
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode(), cache_dir=None)
    try:
        s = repo.write_session()
        bad_x = {b"user.a\x00b": b"v"}
        nodes = []
        for n, data in {**GOOD, b"big": b"pwned\n"}.items():
            bid, _ = s.add_blob(BlobType.DATA, data, Compression())
            nodes.append(_file(n, data, [bid], xattrs=bad_x if n == b"big" else None))
        inner = _file(
            b"inner", b"inner\n", [s.add_blob(BlobType.DATA, b"inner\n", Compression())[0]]
        )
        sub, _ = s.add_blob(BlobType.TREE, tree_to_bytes([inner]), Compression())
        nodes.append(Node(name=b"dir", type="dir", mode=0o40755, subtree=sub, xattrs=bad_x))
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
        s.flush()
        sid = repo.save_snapshot(Snapshot(time.time_ns(), "evil", "evil", ["/evil"], tree))
    finally:
        repo.close()
    target = tmp_path / "t"
    r = cli("restore", sid[:12], "--target", str(target))
    assert r.code == 4, str(r)
    assert_one_line_errors(r.err)
    assert "/big: its metadata cannot be set" in r.err, str(r)
    assert "/dir: cannot set its metadata" in r.err, str(r)
    assert digest(target) == _want({**GOOD, b"dir/inner": b"inner\n"})


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device needs root")
def test_a_device_is_made_of_its_node_type_whatever_the_mode_bits(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode(), cache_dir=None)
    try:
        s = repo.write_session()
        dev = Node(name=b"null", type="chardev", mode=0o666, rdev=os.makedev(1, 3))
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes([dev]), Compression())
        s.flush()
        sid = repo.save_snapshot(Snapshot(time.time_ns(), "h", "u", ["/x"], tree))
    finally:
        repo.close()
    target = tmp_path / "t"
    cli.ok("restore", sid[:12], "--target", str(target))
    st = os.lstat(target / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), oct(st.st_mode)
