"""The command line end to end on an S3 repository: a moto_server process, one bucket per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from safehold.backends.registry import open_backend
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli, Result
from tests.support.checks import stderr_line as _one_line
from tests.support.treecmp import compare_trees

if TYPE_CHECKING:
    from tests.backends.s3server import AuthServer, MotoServer

# s3_server, s3_bucket, s3_auth_server, dead_endpoint
pytest_plugins = ["tests.backends.s3server"]
pytestmark = pytest.mark.s3

PREFIX = "backups/host1"


class S3Cli:
    """``safehold --repo s3://BUCKET/PREFIX -o s3.endpoint=URL …`` in a subprocess."""

    def __init__(self, cli: Cli, bucket: str, endpoint: str, env: dict[str, str]) -> None:
        self.cli = cli
        self.bucket = bucket
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/{PREFIX}"
        cli.env.update(env)

    def args(self) -> list[str]:
        return ["--repo", self.url, "-o", f"s3.endpoint={self.endpoint}"]

    def __call__(self, *args: str, **kw: Any) -> Result:
        return self.cli(*self.args(), *args, repo=False, **kw)

    def ok(self, *args: str, **kw: Any) -> Result:
        r = self(*args, **kw)
        assert r.code == 0, str(r)
        return r


@pytest.fixture
def s3cli(cli: Cli, s3_server: MotoServer, s3_bucket: str) -> S3Cli:
    return S3Cli(cli, s3_bucket, s3_server.url, s3_server.env)


def _objects(server: MotoServer, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every key of the bucket under ``prefix`` → size, listed over HTTP with boto3."""
    out: dict[str, int] = {}
    for page in server.admin.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix
    ):
        for entry in page.get("Contents", []):
            out[entry["Key"]] = entry["Size"]
    return out


def test_init_backup_restore_check(
    s3cli: S3Cli, s3_server: MotoServer, small_tree: Path, tmp_path: Path
) -> None:
    r = s3cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    assert f"at s3://{s3cli.bucket}/{PREFIX}" in r.out
    assert s3cli("init").code == 2  # refuses a location that holds one
    summary = json.loads(s3cli.ok("backup", "--json", str(small_tree)).out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["files_new"] > 10
    keys = _objects(s3_server, s3cli.bucket)
    assert all(k.startswith(PREFIX + "/") for k in keys), sorted(keys)
    tops = {k[len(PREFIX) + 1 :].split("/")[0] for k in keys}
    assert {"config", "keys", "data", "index", "snapshots"} <= tops
    assert not any("//" in k for k in keys)

    snaps = json.loads(s3cli.ok("snapshots", "--json").out)
    assert [s["id"] for s in snaps] == [summary["snapshot"]]
    s3cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(small_tree, tmp_path / "r" / str(small_tree).lstrip("/")) == []
    r = s3cli("check", "--read-data")
    assert r.code == 0, str(r)
    assert "no errors" in r.out


def test_bad_locations_are_one_line_errors(
    s3cli: S3Cli, s3_server: MotoServer, dead_endpoint: str
) -> None:
    # a missing bucket: safehold never creates one
    missing = S3Cli(s3cli.cli, "no-such-bucket", s3_server.url, {})
    for cmd in (["init"], ["snapshots"]):
        r = missing(*cmd)
        assert r.code == 2, str(r)
        assert _one_line(r.err) == (
            f"safehold: bucket 'no-such-bucket' does not exist at {s3_server.url}"
        )
    assert "no-such-bucket" not in {b["Name"] for b in s3_server.admin.list_buckets()["Buckets"]}

    # nothing listening: retried (quickly: botocore's own retries off), then one line
    unreachable = S3Cli(s3cli.cli, s3cli.bucket, dead_endpoint, {})
    for cmd in (["init"], ["snapshots"]):
        started = time.monotonic()
        r = unreachable(*cmd, env={"AWS_MAX_ATTEMPTS": "1"})
        assert r.code == 2, str(r)
        line = _one_line(r.err)
        assert "failed after 6 attempts" in line, line
        assert f"cannot reach {dead_endpoint}" in line, line
        assert time.monotonic() - started < 30

    # an unknown option and a malformed one
    r = s3cli("-o", "s3.endpiont=x", "snapshots")
    assert r.code == 2 and "unknown option 's3.endpiont'" in _one_line(r.err)
    r = s3cli("-o", "s3.region", "snapshots")
    assert r.code == 2 and "not KEY=VALUE" in _one_line(r.err)
    # an empty bucket is no repository
    r = s3cli("snapshots")
    assert r.code == 2 and "there is no repository at s3://" in _one_line(r.err)


def test_wrong_credentials_exit_2(cli: Cli, s3_auth_server: AuthServer) -> None:
    auth = s3_auth_server
    env = {"AWS_ACCESS_KEY_ID": auth.access_key, "AWS_SECRET_ACCESS_KEY": "wrong"}
    s3 = S3Cli(cli, auth.bucket, auth.server.url, auth.server.env)
    r = s3("init", env=env)
    assert r.code == 2, str(r)
    assert _one_line(r.err).startswith(f"safehold: access denied to s3://{auth.bucket}/")
    assert "(check the credentials)" in r.err


def test_sigkill_mid_backup_leaves_no_snapshot_and_uploads_are_reused(
    s3cli: S3Cli, s3_server: MotoServer, tmp_path: Path
) -> None:
    src = tmp_path / "s"
    src.mkdir()
    files = 12
    for i in range(files):
        (src / f"f{i}.bin").write_bytes(os.urandom(8 << 20))
    s3cli.ok("init", "--pack-size", "1M", "--chunk-avg", "256K")
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", *s3cli.args(), "backup", str(src)],
        env=s3cli.cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data_prefix, index_prefix = f"{PREFIX}/data/", f"{PREFIX}/index/"
    deadline = time.time() + 120
    while time.time() < deadline:
        packs = _objects(s3_server, s3cli.bucket, data_prefix)
        indexes = _objects(s3_server, s3cli.bucket, index_prefix)
        if len(packs) >= 3 and indexes:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored_before = sum(_objects(s3_server, s3cli.bucket, data_prefix).values())
    assert stored_before >= 3 << 20
    assert _objects(s3_server, s3cli.bucket, f"{PREFIX}/snapshots/") == {}
    assert json.loads(s3cli.ok("snapshots", "--json").out) == []
    s3cli.ok("check", "--read-data")
    repo = Repository.open(
        open_backend(s3cli.url, {"s3.endpoint": s3cli.endpoint}), PASSWORD.encode()
    )
    indexed_before = sum(p.size for p in repo.index.packs())
    repo.close()
    assert indexed_before > 0
    total = files * (8 << 20)
    assert stored_before < total, "the backup finished before it was killed"
    second = json.loads(s3cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    # the packs indexed before the kill are reused, not uploaded again
    assert second["bytes_uploaded"] < total
    assert second["bytes_uploaded"] <= total - indexed_before + (2 << 20)
    s3cli.ok("check", "--read-data")
    s3cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    for i in range(files):
        restored = tmp_path / "r" / str(src).lstrip("/") / f"f{i}.bin"
        assert restored.read_bytes() == (src / f"f{i}.bin").read_bytes()
