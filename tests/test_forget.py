"""forget through the library: by id, by policy, refusals that delete nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from safehold.errors import SnapshotNotFound, UsageError
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.policy import Policy
from safehold.repository.repo import Repository


def _snapshots(repo: Repository, tmp_path: Path, n: int, **kw: object) -> list[str]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    ids = []
    for i in range(n):
        (src / "f").write_text(f"version {i}")
        result = backup(repo, BackupOptions(paths=[str(src)], **kw))  # type: ignore[arg-type]
        assert result.snapshot is not None
        ids.append(result.snapshot.id)
    return ids


def test_forget_by_id_and_policy(repo: Repository, tmp_path: Path) -> None:
    ids = _snapshots(repo, tmp_path, 4)
    plan = plan_forget(repo, ForgetOptions(snapshots=[ids[0][:8]]))
    assert [s.id for s in plan.remove] == [ids[0]]
    assert forget(repo, plan) == [ids[0]]
    assert [s.id for s in repo.snapshots()] == ids[1:]
    plan = plan_forget(repo, ForgetOptions(policy=Policy(last=2)))
    assert [s.id for s in plan.remove] == [ids[1]]
    assert plan.reasons[ids[3]] == ["last 1/2"]
    forget(repo, plan)
    assert [s.id for s in repo.snapshots()] == ids[2:]
    # the data of what is left still restores
    from safehold.ops.check import check

    assert check(repo).ok


def test_refusals_delete_nothing(repo: Repository, tmp_path: Path) -> None:
    ids = _snapshots(repo, tmp_path, 2, tags=["x"])
    with pytest.raises(UsageError, match="nothing to forget"):
        plan_forget(repo, ForgetOptions())
    with pytest.raises(UsageError, match="not both"):
        plan_forget(repo, ForgetOptions(snapshots=[ids[0]], policy=Policy(last=1)))
    with pytest.raises(SnapshotNotFound):
        plan_forget(repo, ForgetOptions(snapshots=["abcdef12"]))
    with pytest.raises(UsageError, match="every snapshot"):
        plan_forget(repo, ForgetOptions(policy=Policy(tags=("no-such-tag",))))
    assert [s.id for s in repo.snapshots()] == ids
    plan = plan_forget(repo, ForgetOptions(policy=Policy(tags=("no-such-tag",)), allow_empty=True))
    assert len(plan.remove) == 2


def test_future_snapshot_does_not_push_real_ones_out(repo: Repository, tmp_path: Path) -> None:
    ids = _snapshots(repo, tmp_path, 2)
    now = dt.datetime.now().astimezone() - dt.timedelta(days=400)  # both "in the future"
    plan = plan_forget(repo, ForgetOptions(policy=Policy(last=1)), now=now)
    assert {s.id for s in plan.future} == set(ids) and plan.remove == []
