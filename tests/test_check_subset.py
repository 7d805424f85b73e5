"""check --read-data-subset remembers what it read, so repeated runs cover every pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safehold.errors import UsageError
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, Subset, check
from safehold.repository.repo import Repository


def _many_packs(repo: Repository, tmp_path: Path) -> int:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(os.urandom(400_000))
    backup(repo, BackupOptions(paths=[str(src)]))
    packs = len(repo.reload_index().packs())
    assert packs >= 5
    return packs


@pytest.mark.parametrize("spec", ["30%", "1M"])
def test_repeated_subsets_cover_every_pack(repo: Repository, tmp_path: Path, spec: str) -> None:
    total = _many_packs(repo, tmp_path)
    state = tmp_path / "state.json"
    read = 0
    runs = 0
    coverage = []
    while True:
        runs += 1
        res = check(repo, CheckOptions(subset=spec, state_file=state))
        assert res.ok and res.packs_read >= 1
        read += res.packs_read
        coverage.append(res.coverage)
        if res.cycle_complete:
            break
        assert runs < total + 1, "the cycle never completes"
    assert read == total, "each pack is read exactly once in a cycle"
    assert coverage == sorted(coverage) and coverage[-1] == 1.0
    # the next run starts a new cycle
    nxt = check(repo, CheckOptions(subset=spec, state_file=state))
    assert nxt.cycle == res.cycle + 1


def test_subset_parsing() -> None:
    assert Subset.parse("10%").fraction == 0.1
    assert Subset.parse("2/5").slice == (2, 5)
    assert Subset.parse("1.5G").budget == 3 << 29
    for bad in ("0%", "101%", "0/3", "4/3", "x", "5/"):
        with pytest.raises(UsageError):
            Subset.parse(bad)
