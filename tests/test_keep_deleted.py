"""keep_deleted: files matching the patterns that vanished from the source are carried forward
from the parent snapshot (same node, same blobs; nothing is read or stored), and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safehold.ops.backup import BackupOptions, BackupResult, backup
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.repo import Repository
from tests.conftest import Cli


def _run(repo: Repository, src: Path, *keep: str, **kw: object) -> BackupResult:
    res = backup(repo, BackupOptions(paths=[str(src)], keep_deleted=list(keep), **kw))  # type: ignore[arg-type]
    assert res.snapshot is not None
    assert res.warnings == [], res.warnings
    return res


def _entries(repo: Repository, res: BackupResult, src: Path) -> dict[str, object]:
    """The snapshot's entries below ``src``, by relative path."""
    assert res.snapshot is not None
    base = str(src)
    return {
        p[len(base) + 1 :]: n
        for p, n in iter_files(repo, res.snapshot.tree)
        if p.startswith(base + "/")
    }


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _restored(repo: Repository, res: BackupResult, src: Path, target: Path) -> Path:
    assert res.snapshot is not None
    out = restore(repo, res.snapshot, RestoreOptions(target=str(target)))
    assert not out.failed, out.failed
    return target / str(src).lstrip("/")


def _source(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "src"
    (src / "logs" / "old" / "deep").mkdir(parents=True)
    content = {
        "app.log.1": os.urandom(300_000),
        "app.log": b"current log\n" * 100,
        "data": os.urandom(50_000),
        "other.txt": b"not kept\n",
        "logs/old/app.log.2": os.urandom(200_000),
        "logs/old/notes": b"not a log\n",
        "logs/old/deep/app.log.3": b"three\n" * 1000,
    }
    for rel, data in content.items():
        (src / rel).write_bytes(data)
    return src, content


def test_carried_forward_restores_identical(repo: Repository, tmp_path: Path) -> None:
    src, content = _source(tmp_path)
    first = _run(repo, src)
    before = _entries(repo, first, src)
    (src / "app.log.1").unlink()
    (src / "other.txt").unlink()
    shutil.rmtree(src / "logs" / "old")  # a vanished directory holding matching files
    second = _run(repo, src, "app.log.*")
    s = second.summary
    assert s["files_carried"] == 3, s
    # nothing was read, no data stored (only the new trees)
    assert s["bytes_read"] == 0 and s["data_added"] < 10_000, s
    after = _entries(repo, second, src)
    assert "other.txt" not in after  # deleted and not matching: gone
    assert "logs/old/notes" not in after
    for rel in ("app.log.1", "logs/old/app.log.2", "logs/old/deep/app.log.3"):
        old, new = before[rel], after[rel]
        assert new.content == old.content, rel  # type: ignore[attr-defined]
        assert (new.size, new.mtime_ns, new.mode) == (old.size, old.mtime_ns, old.mode)  # type: ignore[attr-defined]
    root = _restored(repo, second, src, tmp_path / "restored")
    for rel in ("app.log.1", "logs/old/app.log.2", "logs/old/deep/app.log.3", "data"):
        assert _sha((root / rel).read_bytes()) == _sha(content[rel]), rel
    assert not (root / "other.txt").exists()
    assert not (root / "logs" / "old" / "notes").exists()
    # the recreated directories keep their recorded metadata
    assert (root / "logs" / "old").stat().st_mtime_ns == before["logs/old"].mtime_ns  # type: ignore[attr-defined]


def test_without_the_option_nothing_is_carried(repo: Repository, tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    _run(repo, src)
    (src / "app.log.1").unlink()
    shutil.rmtree(src / "logs" / "old")
    res = _run(repo, src)
    after = _entries(repo, res, src)
    assert res.summary["files_carried"] == 0
    assert "app.log.1" not in after and "logs/old" not in after


def test_recreated_file_is_the_new_content(repo: Repository, tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    _run(repo, src)
    (src / "app.log.1").unlink()
    fresh = b"rotated again\n" * 500
    (src / "app.log.1").write_bytes(fresh)
    res = _run(repo, src, "app.log.*")
    assert res.summary["files_carried"] == 0
    root = _restored(repo, res, src, tmp_path / "r")
    assert (root / "app.log.1").read_bytes() == fresh


def test_carried_across_two_backups_then_dropped(repo: Repository, tmp_path: Path) -> None:
    src, content = _source(tmp_path)
    _run(repo, src)
    (src / "app.log.1").unlink()
    shutil.rmtree(src / "logs" / "old")
    assert _run(repo, src, "app.log.*").summary["files_carried"] == 3
    (src / "data").write_bytes(b"changed")  # the directory changes again
    third = _run(repo, src, "app.log.*")
    assert third.summary["files_carried"] == 3
    root = _restored(repo, third, src, tmp_path / "r3")
    assert _sha((root / "app.log.1").read_bytes()) == _sha(content["app.log.1"])
    assert _sha((root / "logs/old/deep/app.log.3").read_bytes()) == _sha(
        content["logs/old/deep/app.log.3"]
    )
    # nothing changed on disk, and the option is dropped: the carried files go (a cached
    # directory tree must not bring them back)
    fourth = _run(repo, src)
    after = _entries(repo, fourth, src)
    assert "app.log.1" not in after and "logs/old" not in after, sorted(after)


def test_directory_cache_reuse_keeps_carried(repo: Repository, tmp_path: Path) -> None:
    src, content = _source(tmp_path)
    (src / "quiet").mkdir()
    (src / "quiet" / "f").write_bytes(b"unchanged")
    _run(repo, src)
    (src / "app.log.1").unlink()
    assert _run(repo, src, "app.log.*").summary["files_carried"] == 1
    # nothing changes: unchanged directories are reused, carried files stay
    again = _run(repo, src, "app.log.*")
    assert again.summary["dirs_unchanged"] >= 1, again.summary  # the cache is still in use
    assert again.summary["files_carried"] == 1  # only app.log.1 was deleted
    after = _entries(repo, again, src)
    assert after["app.log.1"].content is not None  # type: ignore[attr-defined]
    root = _restored(repo, again, src, tmp_path / "r")
    assert _sha((root / "app.log.1").read_bytes()) == _sha(content["app.log.1"])


def test_explicit_parent_with_an_unchanged_cached_directory(
    repo: Repository, tmp_path: Path
) -> None:
    """The directory cache was saved by a run without the file; the parent has it: carried."""
    src, content = _source(tmp_path)
    with_log = _run(repo, src)
    assert with_log.snapshot is not None
    (src / "app.log.1").unlink()
    shutil.rmtree(src / "logs" / "old")
    _run(repo, src)  # without the option: the cache now knows the directories without the logs
    res = _run(repo, src, "app.log.*", parent=with_log.snapshot.id)
    assert res.summary["files_carried"] == 3, res.summary
    root = _restored(repo, res, src, tmp_path / "r")
    assert _sha((root / "app.log.1").read_bytes()) == _sha(content["app.log.1"])
    assert (root / "logs/old/app.log.2").read_bytes() == content["logs/old/app.log.2"]


def test_excluded_files_are_not_carried(repo: Repository, tmp_path: Path) -> None:
    src, _ = _source(tmp_path)
    _run(repo, src)
    (src / "app.log.1").unlink()
    # app.log still exists but is excluded now: excluded is not deleted
    res = _run(repo, src, "app.log*", excludes=["app.log", "logs/"])
    after = _entries(repo, res, src)
    assert "app.log" not in after and "logs" not in after
    assert "app.log.1" in after
    assert res.summary["files_carried"] == 1


def test_symlinks_and_patterns_with_directories(repo: Repository, tmp_path: Path) -> None:
    src, content = _source(tmp_path)
    os.symlink("app.log.1", src / "current")
    _run(repo, src)
    os.unlink(src / "current")
    shutil.rmtree(src / "logs")
    res = _run(repo, src, "current", "old/")  # a directory pattern carries what is in it
    after = _entries(repo, res, src)
    assert after["current"].target == b"app.log.1"  # type: ignore[attr-defined]
    assert {"logs/old/app.log.2", "logs/old/notes", "logs/old/deep/app.log.3"} <= set(after)
    assert res.summary["files_carried"] == 4
    root = _restored(repo, res, src, tmp_path / "r")
    assert os.readlink(root / "current") == "app.log.1"
    assert (root / "logs/old/notes").read_bytes() == content["logs/old/notes"]


def test_cli_keep_deleted(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    log = os.urandom(100_000)
    (src / "app.log.1").write_bytes(log)
    (src / "db.delta.7").write_bytes(b"delta")
    (src / "data").write_bytes(b"data")
    cli.ok("init")
    cli.ok("backup", str(src))
    (src / "app.log.1").unlink()
    (src / "db.delta.7").unlink()
    r = cli.ok(
        "backup", "--json", "--keep-deleted", "app.log.*", "--keep-deleted", "*.delta.*", str(src)
    )
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["files_carried"] == 2
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert (tmp_path / "r" / str(src).lstrip("/") / "app.log.1").read_bytes() == log
    text = cli.ok("backup", str(src), "--keep-deleted", "app.log.*").out
    assert "1 carried" in text, text


def test_damaged_data_is_not_carried(cli: Cli, tmp_path: Path) -> None:
    """A vanished file whose data is known damaged cannot be read again: it is named in a
    warning (exit 1) and left out, rather than carried as a reference to damaged data."""
    src = tmp_path / "s"
    src.mkdir()
    (src / "app.log.1").write_bytes(os.urandom(400_000))
    (src / "small").write_bytes(b"s")
    cli.ok("init")
    cli.ok("backup", str(src))
    big = [p for p in cli.repo.rglob("*") if p.is_file() and p.stat().st_size > 300_000]
    assert len(big) == 1, big  # the data pack holding the log
    data = bytearray(big[0].read_bytes())
    data[200_000] ^= 0x5A
    big[0].write_bytes(bytes(data))
    assert cli("check", "--read-data").code == 4  # finds and records the damage
    (src / "app.log.1").unlink()
    r = cli("backup", "--json", "--keep-deleted", "app.log.*", str(src))
    assert r.code == 1, str(r)
    assert "cannot carry" in r.out + r.err and "app.log.1" in r.out + r.err
    summary = json.loads(r.out.splitlines()[-1])
    assert summary["files_carried"] == 0
    names = cli.ok("ls", "latest").out
    assert "app.log.1" not in names and "small" in names
