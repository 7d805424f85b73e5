"""``safehold copy`` and ``safehold mirror`` end to end: local, S3 (moto_server) and rclone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import PASSWORD, Cli, Result
from tests.support.checks import stderr_line
from tests.support.rclone_config import RcloneEnv
from tests.support.treecmp import compare_trees
from tests.support.treegen import mutate_tree

if TYPE_CHECKING:
    from tests.backends.s3server import MotoServer

pytest_plugins = ["tests.backends.s3server", "tests.backends.rclone_env"]

SMALL = ["--chunk-avg", "64K", "--pack-size", "1M"]


def _json(r: Result) -> dict[str, object]:
    obj: dict[str, object] = json.loads(r.out.splitlines()[-1])
    return obj


def _data_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path: Path, small_tree: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(small_tree, root, symlinks=True)
    return root


@pytest.fixture
def two(cli: Cli, tmp_path: Path, tree: Path) -> tuple[Path, Path, str]:
    """Repository A (at cli.repo) with one backup of ``tree``; B's path; A's password file."""
    cli.ok("init", *SMALL)
    cli.ok("backup", str(tree))
    pw = tmp_path / "a.pass"
    pw.write_text(PASSWORD + "\n")
    return cli.repo, tmp_path / "b", str(pw)


def _restore_same(cli: Cli, repo: str, tree: Path, target: Path, *extra: str) -> None:
    cli.ok("--repo", repo, *extra, "restore", "latest", "--target", str(target), repo=False)
    assert compare_trees(tree, target / str(tree).lstrip("/")) == []


def test_copy_local_with_copied_chunker_params(
    cli: Cli, tmp_path: Path, tree: Path, two: tuple[Path, Path, str]
) -> None:
    a, b, pw = two
    r = cli.ok(
        "--repo", str(b), "init", "--copy-chunker-params", "--from-repo", str(a),
        "--from-password-file", pw, repo=False,
    )  # fmt: skip
    assert "created repository" in r.out
    r = cli.ok("--repo", str(b), "--json", "copy", "--from-repo", str(a),
               "--from-password-file", pw, repo=False)  # fmt: skip
    res = _json(r)
    assert res["type"] == "copy" and res["mode"] == "by-id" and len(res["copied"]) == 1  # type: ignore[arg-type]
    assert 0.9 < _data_bytes(b) / _data_bytes(a) < 1.1
    _restore_same(cli, str(b), tree, tmp_path / "r1")
    snaps = json.loads(cli.ok("--repo", str(b), "snapshots", "--json", repo=False).out)
    assert len(snaps) == 1

    # again: nothing copied, nothing stored (the password from the environment this time)
    before = _data_bytes(b)
    r = cli.ok("--repo", str(b), "--json", "copy", "--from-repo", str(a), repo=False,
               env={"SAFEHOLD_FROM_PASSWORD": PASSWORD})  # fmt: skip
    res = _json(r)
    assert res["copied"] == [] and len(res["skipped"]) == 1 and res["bytes_uploaded"] == 0  # type: ignore[arg-type]
    assert _data_bytes(b) == before

    # a second, different snapshot adds about what it added in A
    mutate_tree(tree)
    a_before = _data_bytes(a)
    cli.ok("backup", str(tree))
    added_a = _data_bytes(a) - a_before
    r = cli.ok("--repo", str(b), "copy", "--from-repo", str(a), "--from-password-file", pw,
               "latest", repo=False)  # fmt: skip
    assert "copied 1 snapshots" in r.out, r.out
    assert _data_bytes(b) - before < 1.2 * added_a + (64 << 10)
    _restore_same(cli, str(b), tree, tmp_path / "r2")
    r = cli("--repo", str(b), "check", "--read-data", repo=False)
    assert r.code == 0, str(r)


def test_copy_rechunks_into_s3(
    cli: Cli,
    tmp_path: Path,
    tree: Path,
    two: tuple[Path, Path, str],
    s3_server: MotoServer,
    s3_bucket: str,
) -> None:
    a, _b, pw = two
    cli.env.update(s3_server.env)
    s3 = ["--repo", f"s3://{s3_bucket}/copy", "-o", f"s3.endpoint={s3_server.url}"]
    cli.ok(*s3, "init", "--chunk-avg", "16K", repo=False)
    r = cli.ok(*s3, "--json", "copy", "--from-repo", str(a), "--from-password-file", pw,
               repo=False)  # fmt: skip
    res = _json(r)
    assert res["mode"] == "re-chunk" and len(res["copied"]) == 1  # type: ignore[arg-type]
    _restore_same(cli, f"s3://{s3_bucket}/copy", tree, tmp_path / "r", "-o",
                  f"s3.endpoint={s3_server.url}")  # fmt: skip
    r = cli.ok(*s3, "--json", "copy", "--from-repo", str(a), "--from-password-file", pw,
               repo=False)  # fmt: skip
    assert _json(r)["copied"] == [] and _json(r)["packs_stored"] == 0
    r = cli(*s3, "check", repo=False)
    assert r.code == 0, str(r)


def test_copy_and_init_bad_input(cli: Cli, tmp_path: Path, two: tuple[Path, Path, str]) -> None:
    a, b, pw = two
    cli.ok("--repo", str(b), "init", repo=False)
    cases = [
        (["copy"], "no source repository given"),
        (["copy", "--from-repo", str(a)], "no password given for the source"),
        (["copy", "--from-repo", str(tmp_path / "nothing"), "--from-password-file", pw],
         "there is no repository"),
        (["copy", "--from-repo", str(a), "--from-password-file", pw, "--from-option", "x"],
         "is not KEY=VALUE"),
        (["copy", "--from-repo", str(a), "--from-password-file", pw, "abcdef12"],
         "no snapshot with id"),
        (["copy", "--from-repo", str(b), "--from-password-file", pw], "same repository"),
    ]  # fmt: skip
    for args, text in cases:
        r = cli("--repo", str(b), *args, repo=False)
        assert r.code == 2, (args, str(r))
        assert text in stderr_line(r.err), (args, r.err)
    r = cli("--repo", str(b), "copy", "--from-repo", str(a), repo=False,
            env={"SAFEHOLD_FROM_PASSWORD": "wrong"})  # fmt: skip
    assert r.code == 3 and stderr_line(r.err)
    c = tmp_path / "c"
    for args, text in [
        (["init", "--copy-chunker-params"], "needs --from-repo"),
        (["init", "--from-repo", str(a)], "only with --copy-chunker-params"),
        (["init", "--copy-chunker-params", "--chunk-avg", "1M", "--from-repo", str(a)],
         "exclude each other"),
    ]:  # fmt: skip
        r = cli("--repo", str(c), *args, repo=False)
        assert r.code == 2 and text in stderr_line(r.err), (args, str(r))
    assert not (c / "config").exists()


def test_mirror_to_rclone(
    cli: Cli, tmp_path: Path, tree: Path, rclone_env: RcloneEnv, two: tuple[Path, Path, str]
) -> None:
    a, _b, _pw = two
    cli.env = {k: v for k, v in cli.env.items() if not k.startswith("RCLONE_")} | rclone_env.env
    target = f"rclone:{rclone_env.remote_path('mirror')}"
    on_disk = rclone_env.base / "mirror"
    r = cli.ok("--json", "mirror", target)
    res = _json(r)
    assert res["type"] == "mirror" and res["copied"] > 3 and res["failed"] == []  # type: ignore[operator]
    assert res["bytes_copied"] == sum(
        p.stat().st_size for p in a.rglob("*") if p.is_file() and "locks" not in p.parts
    )
    # the mirror is a repository: same password, checks clean, restores identical
    r = cli("--repo", target, "check", "--read-data", repo=False)
    assert r.code == 0 and "no errors" in r.out, str(r)
    _restore_same(cli, target, tree, tmp_path / "r1")

    # again: nothing transferred
    res = _json(cli.ok("--json", "mirror", target))
    assert res["copied"] == 0 and res["skipped"] > 3 and res["deleted"] == 0

    # forget a snapshot at the source: mirror keeps it, --delete removes it (only it)
    mutate_tree(tree)
    cli.ok("backup", str(tree))
    first = json.loads(cli.ok("snapshots", "--json").out)[0]["id"]
    cli.ok("forget", first)
    stray = on_disk / "index" / ("f" * 64)
    res = _json(cli.ok("--json", "mirror", target))
    assert res["copied"] >= 2 and res["deleted"] == 0
    assert (on_disk / "snapshots" / first).exists()
    stray.write_bytes(b"not the source's")
    res = _json(cli.ok("--json", "mirror", target, "--delete"))
    assert res["deleted"] == 2 and res["copied"] == 0, res
    assert not (on_disk / "snapshots" / first).exists() and not stray.exists()
    snaps = json.loads(cli.ok("--repo", target, "snapshots", "--json", repo=False).out)
    assert [s["id"] for s in snaps] == [
        s["id"] for s in json.loads(cli.ok("snapshots", "--json").out)
    ]
    _restore_same(cli, target, tree, tmp_path / "r2")

    # a target holding another repository is refused, one line
    other = tmp_path / "other"
    cli.ok("--repo", str(other), "init", repo=False)
    r = cli("mirror", str(other))
    assert r.code == 2 and "holds another repository" in stderr_line(r.err)
