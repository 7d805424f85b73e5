"""Hostile repositories, second outside test (issue 8 follow-up).

* A planted snapshot whose 28 tiny trees form a DAG (each level referencing the next twice:
  4x10^8 paths) and whose summary claims 2^29 files. The summary is written with the key, so it
  bounds nothing; the bound a snapshot cannot forge is its expansion relative to its distinct
  entries (docs/format.md §10, ``ops/walk.py``). restore, ls, find, diff and check refuse it
  quickly and cheaply (exit 4, one line naming it); an honest snapshot sharing one folder 200
  times still restores identical and lists every path.
* Every variable-length field of a tree node is bounded by the parser (name, symlink target,
  user and group names, xattr names, values and count): a longer one is refused with a format
  error naming the field, check names the tree (exit 4), restore loses only that entry.

Snapshots are planted through the library (as anyone holding the key could), the commands run
through the CLI.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.errors import FormatError, IntegrityError
from safehold.format.snapshot import Snapshot
from safehold.format.tree import (
    NAME_MAX,
    OWNER_MAX,
    TARGET_MAX,
    XATTR_COUNT_MAX,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    Node,
    salvage_tree,
    tree_from_bytes,
    tree_to_bytes,
)
from safehold.ids import BlobType
from safehold.ops.walk import EXPANSION_SLACK, expansion_bound, tree_totals, walk_tree
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli
from tests.test_hostile import bounded, refused

NOW = 1_700_000_000 * 10**9


def _open(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), PASSWORD.encode(), cache_dir=None)


def _dir(name: bytes, sub: bytes) -> Node:
    return Node(name=name, type="dir", mode=0o040755, mtime_ns=NOW, ctime_ns=NOW, subtree=sub)


def _file(name: bytes, bid: bytes, **kw: Any) -> Node:
    fields: dict[str, Any] = {
        "name": name,
        "type": "file",
        "mode": 0o100644,
        "mtime_ns": NOW,
        "ctime_ns": NOW,
        "size": 1,
        "content": [bid],
    }
    return Node(**(fields | kw))


def _save(repo: Repository, tree: bytes, files: int) -> str:
    summary = {
        "files_new": files,
        "files_changed": 0,
        "files_unmodified": 0,
        "dirs": 0,
        "other_entries": 0,
    }
    return repo.save_snapshot(Snapshot(NOW, "evil", "evil", ["/evil"], tree, summary=summary))


def plant_dag(repo: Repository, depth: int, claim: int) -> tuple[str, int]:
    """The tester's DAG: a leaf tree holding one file, ``depth`` trees each holding two
    directories with the tree below as their subtree; its summary claims ``claim`` files.
    The snapshot's id and the paths its trees expand to."""
    s = repo.write_session()
    bid, _ = s.add_blob(BlobType.DATA, b"x", Compression())
    tid, _ = s.add_blob(BlobType.TREE, tree_to_bytes([_file(b"f", bid)]), Compression())
    total = 1
    for _ in range(depth):
        tid, _ = s.add_blob(
            BlobType.TREE, tree_to_bytes([_dir(b"a", tid), _dir(b"b", tid)]), Compression()
        )
        total = 2 * total + 2
    s.flush()
    return _save(repo, tid, claim), total


@pytest.fixture
def dag(cli: Cli) -> str:
    cli.ok("init", "-q")
    repo = _open(cli)
    try:
        sid, total = plant_dag(repo, 27, 1 << 29)
    finally:
        repo.close()
    assert total > 4 * 10**8
    return sid


def test_expansion_bound_numbers() -> None:
    # the tester's DAG: 2 entries per level, 27 levels, one file: far beyond its bound
    assert expansion_bound(2 * 27 + 1) < 2 * 10**6
    # 1000 identical copies of a 10k-file folder: 10M paths from 11k distinct entries
    assert expansion_bound(10_000 + 1000) >= 1000 * 10_000 + 1000


@pytest.mark.parametrize(
    "args",
    [
        ("restore", "SID", "--target", "OUT"),
        ("ls", "SID"),
        ("find", "*"),
        ("diff", "SID", "SID"),
        ("check",),
    ],
    ids=["restore", "ls", "find", "diff", "check"],
)
def test_dag_with_a_forged_summary_is_refused_quickly(
    cli: Cli, dag: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    argv = [{"SID": dag[:8], "OUT": str(out)}.get(a, a) for a in args]
    run = bounded(cli, *argv)
    assert run.code == 4, str(run)
    said = [x for x in (run.out + run.err).splitlines() if "distinct" in x]
    assert len(said) == 1, str(run)  # one line
    if args[0] in ("check", "find"):
        assert f"snapshot {dag[:8]}" in said[0], str(run)  # naming it
    else:
        refused(run, 4, "distinct")
    # nothing printed or written
    if args[0] in ("ls", "diff"):
        assert run.out.strip() == "", str(run)
    assert not out.exists() or not any(out.iterdir())


def test_sizing_reads_each_distinct_tree_once(cli: Cli) -> None:
    """The library: tree_totals refuses the DAG after reading only its 28 trees, whatever limit
    the summary allows; walk_tree refuses before it yields anything."""
    cli.ok("init", "-q")
    repo = _open(cli)
    try:
        sid, _ = plant_dag(repo, 27, 1 << 29)
        snap = repo.load_snapshot(sid)
        memo: dict[bytes, Any] = {}
        with pytest.raises(IntegrityError, match="distinct"):
            tree_totals(repo, snap.tree, limit=1 << 30, memo=memo)
        assert len(memo) == 28
        with pytest.raises(IntegrityError, match="distinct"):
            next(walk_tree(repo, snap.tree, limit=1 << 30))
        # a walk bounded below the slack is not sized: its own bound stops it
        with pytest.raises(IntegrityError, match="expand beyond"):
            for _ in walk_tree(repo, snap.tree, limit=1000):
                pass
    finally:
        repo.close()


def test_honest_sharing_beyond_the_slack_is_allowed(cli: Cli) -> None:
    """1000 identical copies of a 10,001-entry folder: 10 million paths from 11,001 distinct
    entries, sized by reading two trees; a walk of it starts."""
    cli.ok("init", "-q")
    repo = _open(cli)
    try:
        s = repo.write_session()
        bid, _ = s.add_blob(BlobType.DATA, b"x", Compression())
        folder = tree_to_bytes([_file(b"f%05d" % i, bid) for i in range(10_001)])
        fid, _ = s.add_blob(BlobType.TREE, folder, Compression())
        root = tree_to_bytes([_dir(b"copy%04d" % i, fid) for i in range(1000)])
        rid, _ = s.add_blob(BlobType.TREE, root, Compression())
        s.flush()
        totals = tree_totals(repo, rid, limit=1 << 30)
        assert totals.entries == 1000 * 10_002 > EXPANSION_SLACK
        walk = walk_tree(repo, rid, limit=1 << 30)
        assert next(walk)[0] == (b"copy0000",)
        assert next(walk)[0] == (b"copy0000", b"f00000")
    finally:
        repo.close()


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_honest_snapshot_with_200_identical_folders_restores_and_lists(
    cli: Cli, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for i in range(200):
        d = src / f"copy{i:03d}" / "sub"
        d.mkdir(parents=True)
        for j in range(3):
            (d / f"f{j}").write_bytes(b"same content %d\n" % j)
            os.utime(d / f"f{j}", ns=(NOW, NOW))
        os.utime(d, ns=(NOW, NOW))
        os.utime(d.parent, ns=(NOW, NOW))
    cli.ok("init", "-q")
    cli.ok("backup", "-q", str(src))
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out))
    assert r.code == 0, r
    assert _digest(out / str(src).lstrip("/")) == _digest(src)
    listed = cli.ok("ls", "latest").out.splitlines()
    assert sum(1 for x in listed if x.endswith("/sub/f2")) == 200
    found = cli.ok("find", "f1").out
    assert found.count("/sub/f1") == 200
    assert cli("check").code == 0


# --- variable-length fields of a node ---------------------------------------------------------

ID = b"\x01" * 32

TOO_LONG: list[tuple[dict[str, Any], str]] = [
    ({"name": b"n" * (NAME_MAX + 1)}, "name"),
    ({"type": "symlink", "mode": 0o120777, "target": b"t" * (TARGET_MAX + 1)}, "target"),
    ({"user": "u" * (OWNER_MAX + 1)}, "user"),
    ({"group": "\u00e9" * (OWNER_MAX // 2 + 1)}, "group"),  # 2 bytes per character
    ({"xattrs": {b"user." + b"k" * XATTR_NAME_MAX: b"v"}}, "xattr name"),
    ({"xattrs": {b"user.k": b"v" * (XATTR_VALUE_MAX + 1)}}, "xattr value"),
    ({"xattrs": {b"user.%d" % i: b"" for i in range(XATTR_COUNT_MAX + 1)}}, "xattrs"),
]


def _tree(bad: dict[str, Any]) -> bytes:
    fields = {k: v for k, v in bad.items() if k != "name"}
    nodes = [_file(b"a", ID), _file(bad.get("name", b"b"), ID, **fields), _file(b"c", ID)]
    return tree_to_bytes(nodes)


@pytest.mark.parametrize(("bad", "field"), TOO_LONG, ids=[f for _, f in TOO_LONG])
def test_the_parser_refuses_a_field_beyond_its_bound(bad: dict[str, Any], field: str) -> None:
    data = _tree(bad)
    with pytest.raises(FormatError, match=field):
        tree_from_bytes(data)
    nodes, errs = salvage_tree(data)
    assert [n.name for n in nodes] == [b"a", b"c"]
    assert len(errs) == 1 and field in str(errs[0][1])


def test_the_parser_accepts_every_field_at_its_bound() -> None:
    xattrs = {b"user.%d" % i: b"" for i in range(XATTR_COUNT_MAX - 2)}
    xattrs[b"u" * XATTR_NAME_MAX] = b"v" * XATTR_VALUE_MAX
    node = _file(
        b"n" * NAME_MAX,
        ID,
        user="\u00e9" * (OWNER_MAX // 2),
        group="g" * OWNER_MAX,
        xattrs=xattrs,
    )
    link = Node(name=b"l", type="symlink", mode=0o120777, target=b"t" * TARGET_MAX)
    got = tree_from_bytes(tree_to_bytes([node, link]))
    assert got[1].xattrs == xattrs and got[0].target == b"t" * TARGET_MAX


def test_a_long_user_name_is_damage_and_costs_only_its_entry(cli: Cli, tmp_path: Path) -> None:
    """The tester's planted tree, with an 8 MiB user name (his 600 MiB one: see the report)."""
    cli.ok("init", "-q")
    repo = _open(cli)
    try:
        s = repo.write_session()
        nodes = []
        for name in (b"a_good", b"evil", b"z_good"):
            bid, _ = s.add_blob(BlobType.DATA, name, Compression())
            user = "u" * (8 << 20) if name == b"evil" else "ann"
            nodes.append(_file(name, bid, size=len(name), user=user))
        tid, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression("zstd", 3))
        s.flush()
        sid = _save(repo, tid, 3)
    finally:
        repo.close()
    run = bounded(cli, "check")
    assert run.code == 4 and "user name longer than 1024" in run.out + run.err, str(run)
    assert sid[:8] in run.out + run.err
    out = tmp_path / "out"
    run = bounded(cli, "restore", sid[:8], "--target", str(out))
    assert run.code == 4 and "user name" in run.err, str(run)
    assert sorted(os.listdir(out)) == ["a_good", "z_good"]
    assert (out / "z_good").read_bytes() == b"z_good"
