"""Prune beside a running backup, through the CLI as a user runs them (issue 7, item 1).

A backup of new data stores packs and, every few packs, an index object listing them. Prunes run
in a loop meanwhile with ``--grace-minutes 0``, then twice more once the backup has ended. No pack
the backup stored may be deleted: ``check --read-data`` must pass and the new snapshot restore
byte for byte. One round rarely hits the window (an index object written between prune's loading
of the index and its listing of the index objects), so the test runs several rounds, each in a
fresh repository, and stops at the first that goes wrong.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, Result

ROUNDS = 5
BACKUP_MIB = 64  # the file the running backup reads: new random data, so every chunk is new
OLD_SNAPSHOTS = 3


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size & ((1 << 20) - 1)))


def _prune_ok(r: Result, what: str) -> None:
    # 0 or 1 (warnings) are fine; anything else, or an internal error, is a crash
    assert r.code in (0, 1), f"{what} crashed: {r}"
    assert "internal error" not in r.err and "Traceback" not in r.err, f"{what}: {r}"


def _round(n: int, tmp_path: Path) -> None:
    base = tmp_path / f"round{n}"
    home = base / "home"
    home.mkdir(parents=True)
    cli = Cli(home, base / "repo")
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    old = base / "old"
    old.mkdir()
    for i in range(OLD_SNAPSHOTS):
        _write_random(old / f"f{i}", 1 << 20)
        cli.ok("backup", str(old))

    src = base / "src"
    src.mkdir()
    big = src / "big.bin"
    _write_random(big, BACKUP_MIB << 20)
    want = _sha256(big)

    out, err = base / "backup.out", base / "backup.err"
    cmd = [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "backup", str(src)]
    prunes: list[Result] = []
    with out.open("wb") as fo, err.open("wb") as fe:
        backup = subprocess.Popen(cmd, env=cli.env, stdout=fo, stderr=fe)
        try:
            while backup.poll() is None:
                prunes.append(cli("prune", "--grace-minutes", "0", timeout=120))
            code = backup.wait(timeout=120)
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.wait()
    backup_res = Result(code, out.read_text("utf-8", "replace"), err.read_text("utf-8", "replace"))
    assert code == 0, f"round {n}: the backup failed beside prune: {backup_res}"
    for i, r in enumerate(prunes):
        _prune_ok(r, f"round {n}: prune {i + 1} of {len(prunes)} during the backup")
    for i in range(2):
        _prune_ok(cli("prune", "--grace-minutes", "0"), f"round {n}: prune {i + 1} after it")

    check = cli("check", "--read-data")
    assert check.code == 0, (
        f"round {n} ({len(prunes)} prunes during the backup): check --read-data failed: {check}"
    )
    target = base / "restore"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 0, f"round {n}: restore latest failed: {r}"
    restored = target / str(big).lstrip("/")
    assert restored.is_file(), f"round {n}: {restored} was not restored"
    assert _sha256(restored) == want, f"round {n}: the restored file differs from the source"
    shutil.rmtree(base)  # a passed round's files go (some 200 MiB)


@pytest.mark.slow
def test_prune_in_a_loop_beside_a_running_backup_deletes_nothing_it_needs(tmp_path: Path) -> None:
    t0 = time.monotonic()
    for n in range(1, ROUNDS + 1):
        _round(n, tmp_path)
    print(f"{ROUNDS} rounds of a {BACKUP_MIB} MiB backup in {time.monotonic() - t0:.1f}s")
