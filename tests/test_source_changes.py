"""Files that vanish or change while a backup reads them: named, warned, the rest saved (exit 1
in the CLI). The faults are injected by wrapping the real os.open the backup uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from safehold.events import Event
from safehold.ops import backup as backup_mod
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.restore import iter_files
from safehold.repository.repo import Repository


def _tree(src: Path) -> None:
    src.mkdir()
    for name in ("keep.txt", "gone.txt", "growing.txt"):
        (src / name).write_bytes(name.encode() * 1000)


def test_vanished_and_changed_files(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    _tree(src)
    real_open = os.open

    def faulty_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        p = os.fsdecode(path)
        if p.endswith("gone.txt"):
            os.unlink(p)  # deleted after the walk saw it, before it is read
        fd = real_open(path, flags, *args, **kw)
        if p.endswith("growing.txt"):
            with open(p, "ab") as f:  # written to while the backup reads it
                f.write(b"more")
        return fd

    monkeypatch.setattr(backup_mod.os, "open", faulty_open)
    events: list[Event] = []
    result = backup(repo, BackupOptions(paths=[str(src)]), events=events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("gone.txt" in w and "vanished" in w for w in warnings), warnings
    assert any("growing.txt" in w and "changed while it was read" in w for w in warnings)
    assert len(result.warnings) == 2
    assert result.snapshot is not None
    names = {p.rsplit("/", 1)[-1]: n for p, n in iter_files(repo, result.snapshot.tree)}
    assert "gone.txt" not in names and "keep.txt" in names
    # the changed file is saved as read, consistently
    assert names["growing.txt"].size == sum(
        repo.index.lookup(c).entry.raw_length  # type: ignore[union-attr]
        for c in names["growing.txt"].content or []
    )
