"""The crash harness: kill backup, forget + prune and key passwd with SIGKILL, after the k-th
backend write (every k in turn) and at random moments (seeded; the seed is printed so that a
failure can be replayed with SAFEHOLD_CRASH_SEED). After every kill, the repository checks
clean reading all data, and every snapshot that completed before the kill restores
byte-identical. After a killed password change, the old or the new password opens it.

CI runs at least 200 kills on a tree of 2 MiB. SAFEHOLD_CRASH_ROUNDS=N multiplies the random
kills for a longer run (bench/README.md).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.errors import WrongPassword
from safehold.ops.check import CheckOptions, check
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import Repository
from tests.conftest import FAST_KDF, PASSWORD
from tests.support.treecmp import compare_digests, tree_digest
from tests.support.treegen import make_tree, mutate_tree

SEED = int(os.environ.get("SAFEHOLD_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
ROUNDS = int(os.environ.get("SAFEHOLD_CRASH_ROUNDS", "1"))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
    env.update(
        SAFEHOLD_KDF=FAST_KDF,
        SAFEHOLD_PASSWORD=PASSWORD,
        SAFEHOLD_CACHE_DIR=str(home / "cache"),
        SAFEHOLD_DATA_DIR=str(home / "data"),
        SAFEHOLD_CONFIG_DIR=str(home / "config"),
    )
    env.update(extra)
    return env


def _run(
    repo: Path,
    home: Path,
    *args: str,
    kill_after: int | None = None,
    kill_at: float | None = None,
    **env: str,
) -> int:
    """Run the CLI; return its exit code (-9 when killed)."""
    extra = dict(env)
    if kill_after is not None:
        extra["SAFEHOLD_TEST_KILL_AFTER_WRITES"] = str(kill_after)
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", "--repo", str(repo), *args],
        env=_env(home, **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_at is not None:
        try:
            proc.wait(timeout=kill_at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"safehold {' '.join(args)} failed: {err.decode()}")
    return proc.returncode


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kills = 0
        self.digests: dict[str, dict[bytes, object]] = {}  # snapshot id -> source digest
        self.n = 0

    def verify(self, repo_dir: Path, password: bytes = PASSWORD.encode()) -> Repository:
        """check --read-data is clean and every snapshot we know restores byte-identical."""
        repo = Repository.open(LocalBackend(repo_dir), password)
        res = check(repo, CheckOptions(read_data=True))
        assert res.ok, f"seed {SEED}: check after kill #{self.kills}: {res.errors}"
        present = {s.id: s for s in repo.snapshots()}
        for sid, digest in self.digests.items():
            if sid not in present:
                continue  # forgotten (a forget that completed before the kill)
            self.n += 1
            target = self.tmp / f"restore-{self.n}"
            restore(repo, present[sid], RestoreOptions(target=str(target)))
            src = target / present[sid].paths[0].lstrip("/")
            diffs = compare_digests(digest, tree_digest(src))  # type: ignore[arg-type]
            assert diffs == [], f"seed {SEED}: snapshot {sid[:8]} after kill: {diffs[:3]}"
            shutil.rmtree(target)
        return repo

    def snapshot_ids(self, repo_dir: Path) -> set[str]:
        return {p.name for p in (repo_dir / "snapshots").glob("*") if not p.name.startswith(".")}


@pytest.mark.slow
def test_crash_harness(tmp_path: Path) -> None:
    print(f"crash harness seed {SEED} (replay: SAFEHOLD_CRASH_SEED={SEED})")
    rng = random.Random(SEED)
    h = Harness(tmp_path)
    home = tmp_path / "home"
    src = tmp_path / "src"
    make_tree(src, 2 << 20, seed=SEED % 1000)
    base = tmp_path / "base"
    assert _run(base, home, "init", "--pack-size", "1M", "--chunk-avg", "64K") == 0
    assert _run(base, home, "backup", str(src)) == 0
    (first,) = h.snapshot_ids(base)
    h.digests[first] = tree_digest(src)
    mutate_tree(src, seed=SEED % 1000 + 1)
    v2 = tree_digest(src)
    work = tmp_path / "work"

    def fresh(from_dir: Path) -> Path:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(from_dir, work)
        return work

    # 1. backup killed after each of its writes in turn, then at random moments
    k = 1
    while True:
        repo = fresh(base)
        before = h.snapshot_ids(repo)
        code = _run(repo, home, "backup", str(src), kill_after=k)
        if code == 0:
            break  # k passed the number of writes a backup makes
        h.kills += 1
        # the snapshot object is the commit: killed before it, there is none; killed after
        # it (releasing the lock is the last write), it is complete and must restore
        for sid in h.snapshot_ids(repo) - before:
            h.digests[sid] = v2
        h.verify(repo)
        # the next run completes and repairs nothing by hand
        assert _run(repo, home, "backup", str(src)) == 0
        h.verify(repo)
        k += 1
    backup_writes = k - 1
    assert backup_writes >= 3
    second = max(
        h.snapshot_ids(repo) - {first},
        key=lambda sid: (repo / "snapshots" / sid).stat().st_mtime_ns,
    )
    h.digests[second] = v2
    with_two = tmp_path / "with-two"
    shutil.copytree(repo, with_two)

    # 2. forget --prune killed after each write
    k = 1
    while True:
        repo = fresh(with_two)
        code = _run(
            repo,
            home,
            "forget",
            "--keep-last",
            "1",
            "--prune",
            "--grace-minutes",
            "0",
            kill_after=k,
        )
        if code == 0:
            break
        h.kills += 1
        h.verify(repo)
        assert second in h.snapshot_ids(repo)
        # a later prune finishes the job
        assert (
            _run(repo, home, "forget", "--keep-last", "1", "--prune", "--grace-minutes", "0") == 0
        )
        h.verify(repo)
        k += 1
    assert k > 2

    # 3. key passwd killed after each write: the old or the new password opens
    newpw = tmp_path / "newpw"
    newpw.write_text("the new password")
    for k in (1, 2, 3):
        repo = fresh(with_two)
        code = _run(repo, home, "key", "passwd", "--new-password-file", str(newpw), kill_after=k)
        if code != 0:
            h.kills += 1
        opened = None
        for pw in (PASSWORD.encode(), b"the new password"):
            try:
                opened = h.verify(repo, pw)
                break
            except WrongPassword:
                continue
        assert opened is not None, f"seed {SEED}: no password opens after a killed passwd"

    # 4. random kills: after a random write, or at a random moment, of a random operation
    target = max(200, 200 * ROUNDS)
    while h.kills < target:
        repo = fresh(with_two if rng.random() < 0.5 else base)
        op = rng.choice(["backup", "backup", "prune"])
        args = (
            ["backup", str(src)]
            if op == "backup"
            else ["forget", "--keep-last", "1", "--prune", "--grace-minutes", "0"]
        )
        if rng.random() < 0.5:
            code = _run(repo, home, *args, kill_after=rng.randint(1, backup_writes))
        else:
            code = _run(repo, home, *args, kill_at=rng.uniform(0.2, 0.8))
        if code == 0:
            continue
        h.kills += 1
        h.verify(repo)
    print(f"crash harness: {h.kills} kills, {h.n} restores verified, seed {SEED}")
    assert h.kills >= 200
