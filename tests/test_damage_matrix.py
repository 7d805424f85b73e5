"""The damage matrix of issue 8: every object kind x every kind of damage, judged through the CLI.

A small source tree (a few directories, a file of several chunks spread over two packs, a symlink,
a hardlink) is backed up twice, the second time after a change, into a local repository with two
keys. The pristine repository is built once per module; each cell copies it, damages one object
and asserts that

1. ``check --read-data`` detects the damage with the expected exit code and names the object;
2. every file the damage does not touch still restores identical (and no restore leaves a file
   that differs from its source: a file is restored right or not at all); which files are touched
   is derived from the pristine repository: those whose content blobs or ancestor trees lie in
   the damaged bytes;
3. ``repair index``, ``repair snapshots`` (and, for a damaged key file, ``key remove`` of it; for
   a damaged config, ``repair config``, which writes it back from the key file's copy) and a new
   backup of the same source bring ``check --read-data`` back to exit 0, and the new
   snapshot restores identical;
4. nothing that restored before the repair stops restoring after it: every original snapshot that
   restored a file still exists and restores at least those files, and so does its repaired copy.

Expected exit codes of step 1, per cell (4 = damage found):

* ``key|index|snapshot/duplicate`` (the same bytes also under another valid-looking name of the
  same kind): 4. An object whose content does not match its name is a damaged object, whatever
  it holds: from the repository alone it cannot be told from an object *replaced* by a copy of
  another (its own content lost). check names it and, where the content is a present object,
  says whose copy it is; the repair removes it (``repair index`` rewrites the index objects,
  ``key remove``, ``repair snapshots --forget-originals``).
* ``tree-pack|data-pack/duplicate``: 0 with the copy named: a pack under a wrong name is not
  indexed, and no reader ever looks at it; check lists it among the unindexed packs, which
  prune removes.
* ``config/duplicate``: config has one fixed name, so its copy goes to ``index/<its storage id>``
  (a name that even matches the bytes): 4. It is an index object that cannot be read as one, and
  check cannot know which packs it might have listed.
* ``key/delete``: 0, nothing to name. Removing one of two keys is what ``key remove`` does.
* ``snapshot/delete``: 0, nothing to name. It is what ``forget`` does.
* ``only-key/*`` (the repository's only key damaged): the repository cannot be opened: a one-line
  error naming the key file, exit 3 or 4, no traceback (for ``delete``: any one-line error).
* every other cell: 4.

Key cells: the first key (password ``PASSWORD``) is damaged and every command runs with the second
key's password; the first password must then fail with a one-line error naming the damaged file.
Config cells run with the first password and expect the repository to open (the config's content
is kept in the key files).

Run: ``.venv/bin/pytest -q tests/test_damage_matrix.py`` (one cell: ``-k 'data-pack/blob/flip'``).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.errors import SafeholdError
from safehold.format.pack import PackEntry
from safehold.ids import BlobType, pack_name, storage_id
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli, Result
from tests.support.damage import (
    FileState,
    Layout,
    PackInfo,
    SnapInfo,
    blobs_overlapping,
    file_states,
    flip,
    pack_offsets,
    read_layout,
    stray_id,
    touched,
    tree_with_fewest_files,
    truncate,
)

SECOND_PASSWORD = "the second key's password"
PACK_PARTS = ("header", "trailer", "sealed-key", "blob")


# --- the pristine repository ----------------------------------------------------------------


def _make_source(root: Path) -> None:
    """A few directories and files: ``a/b/big.bin`` spans several chunks and two data packs,
    ``c/hard.txt`` is a hardlink of ``a/one.txt``, ``c/link`` a symlink to it."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    (root / "d" / "e").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("one\n" * 50)
    (root / "a" / "b" / "two.txt").write_text("two\n" * 300)
    (root / "a" / "b" / "big.bin").write_bytes(_noise(b"big", 1_400_000))
    (root / "c" / "mid.bin").write_bytes(_noise(b"mid", 200_000))
    (root / "c" / "hard.txt").hardlink_to(root / "a" / "one.txt")
    (root / "c" / "link").symlink_to("../a/one.txt")
    (root / "d" / "three.txt").write_text("three\n" * 20)
    (root / "d" / "e" / "deep.txt").write_text("deep\n" * 10)


def _change_source(root: Path) -> None:
    with (root / "a" / "one.txt").open("a") as f:  # and so c/hard.txt
        f.write("changed\n")
    (root / "d" / "new.txt").write_bytes(_noise(b"new", 30_000))


def _noise(seed: bytes, n: int) -> bytes:
    """Incompressible, deterministic bytes."""
    import blake3

    return blake3.blake3(seed).digest(length=n)


@dataclass
class Pristine:
    repo: Path
    source: Path
    layout: Layout
    key_a: str  # the first key: PASSWORD
    key_b: str  # the second key: SECOND_PASSWORD
    foreign_config: bytes  # of another repository
    foreign_key: bytes  # of another repository, also opened by PASSWORD
    tree_pack: PackInfo  # holds the first snapshot's root tree
    other_tree_pack: PackInfo
    tree_blob: PackEntry  # a tree of tree_pack with few files below it
    data_pack: PackInfo  # the data pack with blobs of the most files
    other_data_pack: PackInfo
    data_blob: PackEntry
    index_id: str  # lists the second snapshot's tree pack
    other_index: str


def _key_ids(repo: Path) -> set[str]:
    return {p.name for p in (repo / "keys").iterdir()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("matrix")
    source = base / "src"
    _make_source(source)
    home = base / "home"
    home.mkdir()
    cli = Cli(home, base / "repo")
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    (key_a,) = _key_ids(cli.repo)
    cli.ok("backup", str(source))
    expected = [file_states(source)]
    _change_source(source)
    cli.ok("backup", str(source))
    expected.append(file_states(source))
    pwfile = base / "pw2"
    pwfile.write_text(SECOND_PASSWORD + "\n")
    cli.ok("key", "add", "--new-password-file", str(pwfile))
    (key_b,) = _key_ids(cli.repo) - {key_a}
    foreign = Cli(home, base / "foreign")
    foreign.ok("init")
    (foreign_key,) = _key_ids(foreign.repo)

    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        layout = read_layout(repo, source, expected)
    finally:
        repo.close()
    s1, s2 = layout.snaps
    tree_pack, other_tree_pack = layout.pack_of(s1.root), layout.pack_of(s2.root)
    assert tree_pack is not other_tree_pack
    tree_id = tree_with_fewest_files(s1, [b.id for b in tree_pack.blobs])
    data_packs = layout.packs_of(BlobType.DATA)

    def files_in(p: PackInfo) -> tuple[int, list[bytes]]:
        """How many files have blobs in the pack, and which (pack ids are random: the choice
        must not depend on them)."""
        ids = {b.id for b in p.blobs}
        files = {(f, i) for i, s in enumerate(layout.snaps) for f, d in s.deps.items() if d & ids}
        return len(files), sorted(f for f, _ in files)

    data_pack = max(data_packs, key=files_in)
    other_data_pack = max((p for p in data_packs if p is not data_pack), key=lambda p: p.size)
    (index_id,) = [i for i, ps in layout.indexes.items() if other_tree_pack.pack_id in ps]
    return Pristine(
        repo=cli.repo,
        source=source,
        layout=layout,
        key_a=key_a,
        key_b=key_b,
        foreign_config=(foreign.repo / "config").read_bytes(),
        foreign_key=(foreign.repo / "keys" / foreign_key).read_bytes(),
        tree_pack=tree_pack,
        other_tree_pack=other_tree_pack,
        tree_blob=next(b for b in tree_pack.blobs if b.id == tree_id),
        data_pack=data_pack,
        other_data_pack=other_data_pack,
        data_blob=_lost_for_good(data_pack, layout) or data_pack.blobs[0],
        index_id=index_id,
        other_index=min(i for i in layout.indexes if i != index_id),
    )


def _lost_for_good(pack: PackInfo, layout: Layout) -> PackEntry | None:
    """A data blob of ``pack`` that only the first snapshot uses (content the source no longer
    has: a new backup cannot store it again), if the pack holds one. Choosing by pack order
    alone made the cell test this case only when uploads happened to be ordered so."""
    first, *rest = layout.snaps
    later = {b for s in rest for deps in s.deps.values() for b in deps}
    for b in sorted(pack.blobs, key=lambda e: e.id):
        if any(b.id in deps for deps in first.deps.values()) and b.id not in later:
            return b
    return None


# --- the cells ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    kind: str  # config, key, only-key, index, snapshot, tree-pack, data-pack
    damage: str  # flip, truncate, delete, duplicate, replace
    part: str = ""  # packs, with flip: header, trailer, sealed-key, blob

    @property
    def id(self) -> str:
        return "/".join(x for x in (self.kind, self.part, self.damage) if x)


CELLS = [
    *(
        Cell(k, d)
        for k in ("config", "key", "index", "snapshot")
        for d in ("flip", "truncate", "delete", "duplicate", "replace")
    ),
    *(Cell("only-key", d) for d in ("flip", "truncate", "delete", "replace")),
    *(
        c
        for k in ("tree-pack", "data-pack")
        for c in (
            *(Cell(k, "flip", part) for part in PACK_PARTS),
            *(Cell(k, d) for d in ("truncate", "delete", "duplicate", "replace")),
        )
    ),
]


@dataclass
class Damage:
    """What a cell did and what it expects."""

    names: list[str]  # check must print one of these (empty: nothing to name)
    check_exit: int = 4
    blobs: set[bytes] = field(default_factory=set)  # blobs whose stored bytes are damaged
    lost_snaps: set[str] = field(default_factory=set)  # snapshots whose every file is touched
    password: str = PASSWORD
    heal: list[list[str]] = field(default_factory=list)  # CLI steps besides the two repairs
    locked_out: str = ""  # a damaged key file that PASSWORD must now fail on, naming it


def _damage_object(path: Path, cell: Cell, replacement: bytes) -> None:
    data = path.read_bytes()
    if cell.damage == "flip":
        flip(path, len(data) // 2)
    elif cell.damage == "truncate":
        truncate(path, len(data) // 2)
    elif cell.damage == "delete":
        path.unlink()
    elif cell.damage == "replace":
        assert replacement != data
        path.write_bytes(replacement)
    else:
        raise AssertionError(cell.damage)


def _duplicate(repo: Path, prefix: str, data: bytes) -> str:
    """Store ``data`` again under a wrong but valid-looking name; its id."""
    sid = stray_id(data)
    name = pack_name(sid) if prefix == "data/" else prefix + sid
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_bytes(data)
    return sid


def apply_damage(cell: Cell, p: Pristine, repo: Path) -> Damage:
    lay = p.layout
    s1, s2 = lay.snaps
    if cell.kind == "config":
        path = repo / "config"
        if cell.damage == "duplicate":
            data = path.read_bytes()
            (repo / "index" / storage_id(data)).write_bytes(data)
            return Damage([storage_id(data)[:8]])
        _damage_object(path, cell, p.foreign_config)
        return Damage(["config"], heal=[["repair", "config"]])
    if cell.kind in ("key", "only-key"):
        path = repo / "keys" / p.key_a
        if cell.kind == "only-key":
            (repo / "keys" / p.key_b).unlink()
            _damage_object(path, cell, p.foreign_key)
            return Damage([p.key_a[:8]] if cell.damage != "delete" else [])
        if cell.damage == "duplicate":
            sid = _duplicate(repo, "keys/", path.read_bytes())
            return Damage([sid[:8]], password=SECOND_PASSWORD, heal=[["key", "remove", sid[:16]]])
        _damage_object(path, cell, (repo / "keys" / p.key_b).read_bytes())
        if cell.damage == "delete":
            return Damage([], check_exit=0, password=SECOND_PASSWORD)
        return Damage(
            [p.key_a[:8]],
            password=SECOND_PASSWORD,
            heal=[["key", "remove", p.key_a[:16]]],
            locked_out=p.key_a,
        )
    if cell.kind == "index":
        path = repo / "index" / p.index_id
        if cell.damage == "duplicate":
            return Damage([_duplicate(repo, "index/", path.read_bytes())[:8]])
        _damage_object(path, cell, (repo / "index" / p.other_index).read_bytes())
        names = [p.index_id[:8]]
        if cell.damage == "delete":  # its id is gone with it: the packs it listed are named
            names += [pid[:8] for pid in lay.indexes[p.index_id]]
        return Damage(names, blobs=lay.only_in(p.index_id))
    if cell.kind == "snapshot":
        path = repo / "snapshots" / s1.snap_id
        if cell.damage == "duplicate":
            return Damage(
                [_duplicate(repo, "snapshots/", path.read_bytes())[:8]],
                heal=[["repair", "snapshots", "--forget-originals"]],
            )
        _damage_object(path, cell, (repo / "snapshots" / s2.snap_id).read_bytes())
        if cell.damage == "delete":
            return Damage([], check_exit=0, lost_snaps={s1.snap_id})
        return Damage(
            [s1.snap_id[:8]],
            lost_snaps={s1.snap_id},
            heal=[["repair", "snapshots", "--forget-originals"]],
        )
    # packs
    if cell.kind == "tree-pack":
        pack, other, blob = p.tree_pack, p.other_tree_pack, p.tree_blob
    else:
        pack, other, blob = p.data_pack, p.other_data_pack, p.data_blob
    path = repo / pack_name(pack.pack_id)
    data = path.read_bytes()
    names = [pack.pack_id[:8]]
    if cell.damage == "flip":
        off = pack_offsets(pack, data, blob)[cell.part]
        flip(path, off)
        if cell.part == "blob":
            names.append(blob.id.hex()[:8])
        return Damage(names, blobs=blobs_overlapping(pack, off, off + 1))
    if cell.damage == "truncate":
        truncate(path, len(data) // 2)
        return Damage(names, blobs=blobs_overlapping(pack, len(data) // 2, len(data)))
    if cell.damage == "duplicate":
        return Damage([_duplicate(repo, "data/", data)[:8]], check_exit=0)
    replacement = (repo / pack_name(other.pack_id)).read_bytes()
    _damage_object(path, cell, replacement)
    return Damage(names, blobs={b.id for b in pack.blobs})


# --- judging --------------------------------------------------------------------------------


def _gist(r: Result) -> str:
    lines = [x.strip() for x in (r.err + "\n" + r.out).splitlines() if x.strip()]
    text = " | ".join(lines[:3])
    return f"exit {r.code}: {text[:300]}"


class Judge:
    """Runs the CLI for one cell and collects every problem (so that a failing cell reports all
    that is wrong with it, not only the first thing)."""

    def __init__(self, cli: Cli, tmp: Path, source: Path) -> None:
        self.cli = cli
        self.tmp = tmp
        self.source = source
        self.problems: list[str] = []
        self.n = 0

    def run(self, step: str, *args: str, ok: tuple[int, ...] | None = None, **kw: object) -> Result:
        r = self.cli(*args, **kw)  # type: ignore[arg-type]
        if "Traceback" in r.err or "Traceback" in r.out:
            tb = [x for x in r.err.splitlines() if x.strip()][-1:]
            self.problems.append(f"{step}: `{' '.join(args)}` shows a traceback: {tb}")
        elif ok is not None and r.code not in ok:
            self.problems.append(f"{step}: `{' '.join(args)}` {_gist(r)}")
        return r

    def restore(
        self,
        step: str,
        spec: str,
        expected: dict[bytes, FileState],
        may_fail: set[bytes],
    ) -> set[bytes]:
        """Restore a snapshot; the files restored identical. Every file not in ``may_fail``
        must be among them; no file may be restored with other content than its source's."""
        self.n += 1
        target = self.tmp / f"restore-{self.n}"
        r = self.run(step, "restore", spec, "--target", str(target))
        root = target / str(self.source).lstrip("/")
        got = file_states(root) if root.is_dir() else {}
        ok = {f for f, want in expected.items() if got.get(f) == want}
        fake = sorted(f.decode() for f in got if f in expected and f not in ok)
        extra = sorted(f.decode() for f in got if f not in expected)
        lost = sorted(f.decode() for f in expected if f not in ok and f not in may_fail)
        where = f"{step}: restore {spec[:8]}"
        if fake or extra:
            self.problems.append(f"{where}: differs from its source: {fake + extra} ({_gist(r)})")
        if lost:
            self.problems.append(f"{where}: untouched files not restored: {lost} ({_gist(r)})")
        if ok and len(ok) < len(expected) and r.code != 4:
            missing = sorted(f.decode() for f in expected if f not in ok)
            self.problems.append(f"{where}: {_gist(r)}, but did not restore {missing} (want 4)")
        elif ok and r.code not in (0, 1, 4):  # 1: a warning, e.g. about another snapshot
            self.problems.append(f"{where}: {_gist(r)}")
        if not ok and r.code == 0:
            self.problems.append(f"{where}: nothing restored, exit 0")
        return ok


def _one_line_error(step: str, r: Result, names: list[str], codes: tuple[int, ...]) -> list[str]:
    lines = [x for x in r.err.splitlines() if x.strip()]
    out = []
    if r.code not in codes or len(lines) != 1 or "Traceback" in r.err:
        out.append(f"{step}: wanted one error line and exit {codes}, got {_gist(r)}")
    elif names and not any(n in lines[0] for n in names):
        out.append(f"{step}: the error does not name {names}: {lines[0][:200]}")
    return out


def _snapshots(repo: Path, password: str) -> list[tuple[str, int, list[str]]] | str:
    """(id, time, tags) of every readable snapshot, or why the repository would not open."""
    try:
        r = Repository.open(LocalBackend(repo), password.encode())
    except SafeholdError as e:
        return str(e)
    try:
        return [(s.id, s.time_ns, list(s.tags)) for s in r.snapshots()]
    finally:
        r.close()


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_damage_matrix(cell: Cell, pristine: Pristine, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(pristine.repo, repo)
    dmg = apply_damage(cell, pristine, repo)
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(home, repo)
    cli.env["SAFEHOLD_PASSWORD"] = dmg.password
    j = Judge(cli, tmp_path, pristine.source)

    # 1. check detects and names it
    r = j.run("1 check", "check", "--read-data")
    said = r.out + r.err
    if cell.kind == "only-key":
        j.problems += _one_line_error("1 check", r, dmg.names, (3, 4))
        if j.problems:
            pytest.fail(f"{cell.id}:\n  " + "\n  ".join(j.problems), pytrace=False)
        return
    if r.code != dmg.check_exit:
        j.problems.append(f"1 check: expected exit {dmg.check_exit}, got {_gist(r)}")
    if dmg.names and not any(n in said for n in dmg.names):
        j.problems.append(f"1 check: names none of {dmg.names}: {_gist(r)}")
    if dmg.locked_out:
        pw = j.run("1 first password", "snapshots", env={"SAFEHOLD_PASSWORD": PASSWORD})
        j.problems += _one_line_error("1 first password", pw, [dmg.locked_out[:8]], (3, 4))

    # 2. what the damage does not touch restores identical
    before: dict[str, set[bytes]] = {}
    for s in pristine.layout.snaps:
        may_fail = set(s.expected) if s.snap_id in dmg.lost_snaps else touched(s, dmg.blobs)
        before[s.snap_id] = j.restore("2", s.snap_id, s.expected, may_fail)

    # 3. repair and a new backup bring check back to clean
    j.run("3 repair", "repair", "index", ok=(0, 1, 4))
    j.run("3 repair", "repair", "snapshots", ok=(0, 1, 4))
    for step in dmg.heal:
        j.run("3 heal", *step, ok=(0,))
    b = j.run("3 backup", "backup", str(pristine.source), ok=(0, 1))
    saved = re.search(r"snapshot ([0-9a-f]{8,}) saved", b.out + b.err)
    r = j.run("3 check", "check", "--read-data")
    if r.code != 0:
        damage = [x for x in r.out.splitlines() if x.startswith("damage:")]
        j.problems.append(f"3 check after repair: {_gist(r)} {damage[:2]}")
    latest = pristine.layout.snaps[-1]
    if saved is None:
        j.problems.append(f"3 backup saved no snapshot: {_gist(b)}")
    else:
        j.restore("3 new snapshot", saved.group(1), latest.expected, set())

    # 4. nothing that restored before stops restoring
    listed = _snapshots(repo, dmg.password)
    if isinstance(listed, str):
        j.problems.append(f"4: the repository does not open: {listed}")
        listed = []
    by_id = {sid: (t, tags) for sid, t, tags in listed}
    for s in pristine.layout.snaps:
        _check_kept(j, s, before[s.snap_id], by_id)
    if j.problems:
        pytest.fail(f"{cell.id}:\n  " + "\n  ".join(j.problems), pytrace=False)


def _check_kept(
    j: Judge, s: SnapInfo, restored: set[bytes], listed: dict[str, tuple[int, list[str]]]
) -> None:
    """Step 4 for one original snapshot that restored ``restored`` before the repair."""
    if not restored:
        return
    others = set(s.expected) - restored
    if s.snap_id not in listed:
        j.problems.append(f"4: snapshot {s.snap_id[:8]} restored {len(restored)} files but is gone")
    else:
        got = j.restore("4 original", s.snap_id, s.expected, others)
        if restored - got:
            lost = sorted(f.decode() for f in restored - got)
            j.problems.append(f"4: original {s.snap_id[:8]} no longer restores {lost}")
    for sid, (t2, tags) in listed.items():
        if t2 == s.time_ns and sid != s.snap_id and "repaired" in tags:
            got = j.restore("4 repaired", sid, s.expected, others)
            if restored - got:
                j.problems.append(
                    f"4: repaired copy {sid[:8]} of {s.snap_id[:8]} does not restore "
                    f"{sorted(f.decode() for f in restored - got)}"
                )
