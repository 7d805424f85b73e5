"""Bad input and damage: one clear line, the right exit code, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli
from tests.support.checks import stderr_line as _one_line


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_wrong_password_exit_3_and_writes_nothing(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_text("x")
    cli.ok("init")
    cli.ok("backup", str(src))
    before = _state(cli.repo)
    for cmd in (
        ["backup", str(src)],
        ["snapshots"],
        ["check"],
        ["restore", "latest", "-t", str(tmp_path / "r")],
        ["key", "list"],
    ):
        r = cli(*cmd, env={"SAFEHOLD_PASSWORD": "wrong"})
        assert r.code == 3, str(r)
        assert "wrong password" in _one_line(r.err)
    assert _state(cli.repo) == before
    assert not (tmp_path / "r").exists()


def test_missing_repository_and_missing_password(cli: Cli, tmp_path: Path) -> None:
    r = cli("snapshots")
    assert r.code == 2 and "no repository" in _one_line(r.err)
    cli.ok("init")
    env = dict(cli.env)
    env.pop("SAFEHOLD_PASSWORD")
    proc = subprocess.run(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "snapshots"],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2
    assert "no password given" in _one_line(proc.stderr.decode())
    r = cli("init")
    assert r.code == 2 and "already exists" in _one_line(r.err)
    r = cli("backup", str(tmp_path / "does-not-exist"))
    assert r.code == 2 and "no such file" in _one_line(r.err)


def test_password_sources_precedence(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    pwf = tmp_path / "pw"
    pwf.write_text(PASSWORD + "\n")
    wrong = {"SAFEHOLD_PASSWORD": "wrong"}
    assert cli("snapshots", "--password-file", str(pwf), env=wrong).code == 0
    assert cli("snapshots", "--password-command", f"cat {pwf}", env=wrong).code == 0
    assert cli("snapshots", env=wrong | {"SAFEHOLD_PASSWORD_FILE": str(pwf)}).code == 0
    assert cli("snapshots", env=wrong | {"SAFEHOLD_PASSWORD_COMMAND": f"cat {pwf}"}).code == 0
    # the command beats the file
    bad = tmp_path / "bad"
    bad.write_text("nope")
    r = cli("snapshots", "--password-file", str(bad), "--password-command", f"cat {pwf}")
    assert r.code == 0
    r = cli("snapshots", "--password-command", "exit 3")
    assert r.code == 2 and "password command" in r.err


def _repo(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), PASSWORD.encode())


def test_flipped_byte_found_by_check_read_data_naming_the_file(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "victim.bin").write_bytes(os.urandom(200_000))
    (src / "other.txt").write_text("fine " * 1000)
    cli.ok("init")
    cli.ok("backup", str(src))
    assert "no errors" in cli.ok("check", "--read-data").out
    repo = _repo(cli)
    snap = repo.find_snapshot("latest")
    node = None
    for path, n in __import__("safehold.ops.restore", fromlist=["x"]).iter_files(repo, snap.tree):
        if path.endswith("victim.bin"):
            node = n
    assert node is not None and node.content
    loc = repo.index.lookup(node.content[0])
    assert loc is not None
    pack = cli.repo / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    raw = bytearray(pack.read_bytes())
    raw[loc.entry.offset + loc.entry.length // 2] ^= 0x01
    pack.write_bytes(bytes(raw))
    r = cli("check", "--read-data")
    assert r.code == 4, str(r)
    assert "victim.bin" in r.out
    assert "other.txt" not in r.out
    # restore reports the damaged file and exits non-zero, restoring the rest
    r = cli("restore", "latest", "--target", str(tmp_path / "r"))
    assert r.code == 4 and "victim.bin" in r.err
    assert not (tmp_path / "r" / str(src).lstrip("/") / "victim.bin").exists()  # never a fake file
    restored = tmp_path / "r" / str(src).lstrip("/")
    assert (restored / "other.txt").read_text() == "fine " * 1000


def test_check_finds_damage_with_a_warm_cache(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("data")
    cli.ok("init")
    cli.ok("backup", str(src))
    cli.ok("ls", "latest")  # warms the cache with the index and the tree packs
    assert any((Path(cli.env["SAFEHOLD_CACHE_DIR"])).rglob("data/*/*"))
    repo = _repo(cli)
    tree_packs = {
        p.pack_id.hex() for p in repo.index.packs() if all(b.type == BlobType.TREE for b in p.blobs)
    }
    assert tree_packs
    for pid in tree_packs:
        path = cli.repo / "data" / pid[:2] / pid
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0xFF
        path.write_bytes(bytes(raw))
    r = cli("check")
    assert r.code == 4, str(r)
    assert "errors found" in r.out


def test_tree_entry_escaping_the_target_is_refused(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    repo = _repo(cli)
    s = repo.write_session()
    data_id, _ = s.add_blob(BlobType.DATA, b"evil", Compression())
    for bad in (b"../x", b"..", b"a/../../x", b"/etc/x"):
        evil = Node(name=bad, type="file", mode=0o100644, size=4, content=[data_id])
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes([evil]), Compression())
        s.flush()
        repo.save_snapshot(Snapshot(time.time_ns(), "evil", "evil", ["/x"], tree))
        target = tmp_path / "t" / "inner"
        r = cli("restore", "latest", "--target", str(target))
        assert r.code != 0, str(r)
        assert "unsafe name" in r.err
        assert not (tmp_path / "t" / "x").exists() and not (tmp_path / "x").exists()
        time.sleep(0.01)


def test_symlinked_parent_cannot_redirect_restore(cli: Cli, tmp_path: Path) -> None:
    """A snapshot holding a symlink and a directory of the same name cannot write through it."""
    cli.ok("init")
    repo = _repo(cli)
    s = repo.write_session()
    outside = tmp_path / "outside"
    outside.mkdir()
    data_id, _ = s.add_blob(BlobType.DATA, b"evil", Compression())
    inner, _ = s.add_blob(
        BlobType.TREE,
        tree_to_bytes([Node(name=b"pwned", type="file", mode=0o100644, size=4, content=[data_id])]),
        Compression(),
    )
    link = Node(name=b"a", type="symlink", mode=0o120777, target=str(outside).encode())
    d = Node(name=b"b", type="dir", mode=0o40755, subtree=inner)
    tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes([link, d]), Compression())
    s.flush()
    repo.save_snapshot(Snapshot(time.time_ns(), "evil", "evil", ["/x"], tree))
    target = tmp_path / "t"
    target.mkdir()
    (target / "b").symlink_to(outside)  # a pre-existing symlink where a directory will go
    cli("restore", "latest", "--target", str(target))
    assert not (outside / "pwned").exists()
    assert (target / "b" / "pwned").read_bytes() == b"evil"


def _unprivileged(cmd: list[str]) -> list[str]:
    """Run without the power to bypass file permissions: as root, drop the DAC capabilities."""
    if os.geteuid() != 0:
        return cmd
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root without setpriv, cannot make a file unreadable",
)
def test_unreadable_file_gives_warning_and_exit_1(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "ok.txt").write_text("readable")
    locked = src / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    cli.ok("init")
    proc = subprocess.run(
        _unprivileged(
            [
                sys.executable,
                "-m",
                "safehold",
                "--repo",
                str(cli.repo),
                "backup",
                "--json",
                str(src),
            ]
        ),
        env=cli.env,
        capture_output=True,
        check=False,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc.stderr.decode() + out
    warnings = [json.loads(x) for x in out.splitlines() if '"warning"' in x]
    assert any("locked.txt" in w["message"] for w in warnings)
    summary = json.loads(out.splitlines()[-1])
    assert summary["snapshot"]
    listing = cli.ok("ls", "latest").out
    assert "ok.txt" in listing and "locked.txt" not in listing


def test_locked_repository_exit_5(cli: Cli, tmp_path: Path) -> None:
    import json as _json
    import socket

    cli.ok("init")
    lock = {
        "v": 1,
        "host": "elsewhere-" + socket.gethostname(),
        "pid": 1,
        "user": "x",
        "time": time.time(),
        "expires": time.time() + 300,
        "exclusive": True,
    }
    (cli.repo / "locks").mkdir(exist_ok=True)
    (cli.repo / "locks" / ("ab" * 32)).write_text(_json.dumps(lock))
    src = tmp_path / "s"
    src.mkdir()
    r = cli("backup", str(src))
    assert r.code == 5 and "locked" in _one_line(r.err)
    # a lock of a dead process on this host, this boot, this PID namespace is stale at once
    from safehold.repository.locks import _boot_id, _pid_namespace

    lock |= {"host": socket.gethostname(), "boot_id": _boot_id(), "pidns": _pid_namespace()}
    lock |= {"pid": 2**22 + 12345, "start": 12345}
    (cli.repo / "locks" / ("ab" * 32)).write_text(_json.dumps(lock))
    cli.ok("backup", str(src))
    assert "removed 1" in cli.ok("unlock").out
    # without the boot and namespace (another container with the same host name, or an old
    # client), the pid proves nothing: the lock holds until its lease ends
    for drop in ("boot_id", "pidns", "start"):
        stripped = {k: v for k, v in lock.items() if k != drop}
        (cli.repo / "locks" / ("ab" * 32)).write_text(_json.dumps(stripped))
        r = cli("backup", str(src))
        assert r.code == 5 and "locked" in _one_line(r.err), drop
    other_ns = lock | {"pidns": "pid:[1]"}
    (cli.repo / "locks" / ("ab" * 32)).write_text(_json.dumps(other_ns))
    assert cli("backup", str(src)).code == 5


def test_corrupt_config_is_named_and_repaired_from_the_key_files_copy(cli: Cli) -> None:
    """A damaged config left no way in; now the copy in the key file opens the repository, every
    command warns, check fails naming the config, and 'repair config' writes it back."""
    cli.ok("init")
    cfg = cli.repo / "config"
    good = cfg.read_bytes()
    raw = bytearray(good)
    raw[-1] ^= 1
    cfg.write_bytes(bytes(raw))
    r = cli("snapshots")
    assert r.code == 0 and "config" in _one_line(r.err) and "repair config" in r.err, r
    r = cli("check")
    assert r.code == 4 and "config" in r.err + r.out, r
    assert "would write" in cli.ok("repair", "config", "--dry-run").out
    assert cfg.read_bytes() == bytes(raw)
    assert "wrote the config back" in cli.ok("repair", "config").out
    assert cfg.read_bytes()[:10] == good[:10]  # the clear header
    r = cli.ok("check")
    assert "config" not in r.err, r
    assert "nothing to do" in cli.ok("repair", "config").out


def test_sigkill_mid_backup_leaves_no_snapshot_and_uploads_are_reused(
    cli: Cli, tmp_path: Path
) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}.bin").write_bytes(os.urandom(8 << 20))
    cli.ok("init", "--pack-size", "1M", "--chunk-avg", "256K")
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "backup", str(src)],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data_dir, index_dir = cli.repo / "data", cli.repo / "index"
    deadline = time.time() + 60
    while time.time() < deadline:
        packs = [p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        indexes = [p for p in index_dir.glob("*") if not p.name.startswith(".")]
        if len(packs) >= 3 and indexes:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored_before = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    assert stored_before >= 3 << 20
    assert not (cli.repo / "snapshots").exists() or not any((cli.repo / "snapshots").iterdir())
    snaps = json.loads(cli.ok("snapshots", "--json").out)
    assert snaps == []
    cli.ok("check", "--read-data")
    repo = _repo(cli)
    indexed_before = sum(p.size for p in repo.index.packs())
    assert indexed_before > 0
    total = 12 * (8 << 20)
    assert stored_before < total, "the backup finished before it was killed"
    second = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    # the packs indexed before the kill are reused, not uploaded again
    assert second["bytes_uploaded"] < total
    assert second["bytes_uploaded"] <= total - indexed_before + (2 << 20)
    cli.ok("check", "--read-data")
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    for i in range(12):
        restored = tmp_path / "r" / str(src).lstrip("/") / f"f{i}.bin"
        assert restored.read_bytes() == (src / f"f{i}.bin").read_bytes()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return r.returncode == 0


def test_full_disk_is_one_line_exit_2_and_loses_nothing(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "6m"):
        pytest.skip("needs root and mount to make a small filesystem")
    try:
        cli.repo = disk / "repo"
        src = tmp_path / "s"
        src.mkdir()
        (src / "small.txt").write_text("fits")
        cli.ok("init", "--pack-size", "1M")
        first = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
        for i in range(4):
            (src / f"big{i}.bin").write_bytes(os.urandom(3 << 20))
        r = cli("backup", str(src))
        assert r.code == 2, str(r)
        assert "disk full" in _one_line(r.err)
        # nothing lost: the earlier snapshot is intact and the repository checks clean
        snaps = json.loads(cli.ok("snapshots", "--json").out)
        assert [s["id"] for s in snaps] == [first["snapshot"]]
        cli.ok("check", "--read-data")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "safehold",
                "--repo",
                str(cli.repo),
                "dump",
                "latest",
                str(src / "small.txt"),
            ],
            env=cli.env,
            capture_output=True,
            check=True,
        ).stdout
        assert out == b"fits"
    finally:
        subprocess.run(["umount", str(disk)], check=False)
