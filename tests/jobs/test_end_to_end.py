"""The jobs file end to end, with real servers: two jobs on two repositories (local and S3 on
moto_server), a command source, hooks, copy to a second S3 repository and a mirror to an rclone
remote; a failing job alerts by email (aiosmtpd) and webhook (a local HTTP server) with its log
tail and without secrets; health-check pings, Prometheus metrics, and the dead man's switch."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from safehold.jobs.history import History
from tests.conftest import PASSWORD
from tests.jobs.jobenv import JobEnv, repo_block
from tests.jobs.servers import http_capture, smtp_capture
from tests.support.rclone_config import RcloneEnv
from tests.support.treecmp import compare_trees

if TYPE_CHECKING:
    from tests.backends.s3server import MotoServer

pytest_plugins = ["tests.backends.s3server", "tests.backends.rclone_env"]


def test_jobs_file_end_to_end(
    tmp_path: Path, s3_server: MotoServer, rclone_env: RcloneEnv, small_tree: Path
) -> None:
    env = JobEnv(tmp_path)
    env.cli.env = {
        k: v for k, v in env.cli.env.items() if not k.startswith("RCLONE_")
    } | s3_server.env | rclone_env.env  # fmt: skip
    tree = tmp_path / "tree"
    shutil.copytree(small_tree, tree, symlinks=True)
    endpoint = {"s3.endpoint": s3_server.url}
    bucket = s3_server.new_bucket()
    local, db, offsite = str(tmp_path / "local"), f"s3://{bucket}/db", f"s3://{bucket}/offsite"
    env.init_repo(local)
    assert env.repo_cli(db, "-o", f"s3.endpoint={s3_server.url}", "init").code == 0
    r = env.repo_cli(
        offsite, "-o", f"s3.endpoint={s3_server.url}", "init", "--copy-chunker-params",
        "--from-repo", local, "--from-password-file", str(env.pwfile),
    )  # fmt: skip
    assert r.code == 0, str(r)
    mirror = f"rclone:{rclone_env.remote_path('mirror')}"
    dump = tmp_path / "dump.sh"
    dump.write_text("#!/bin/sh\necho 'CREATE TABLE t (x int);'\nhead -c 200000 /dev/zero\n")
    dump.chmod(0o755)
    marker = tmp_path / "before.txt"
    metrics = tmp_path / "metrics" / "safehold.prom"
    metrics.parent.mkdir()
    with smtp_capture() as smtp, http_capture() as http:
        notify = json.dumps([smtp.url(to="me@example.net", sender="safehold@example.net"),
                             http.json_url("/hook")])  # fmt: skip
        env.write(
            repo_block("local", local, env.pwfile)
            + repo_block("db", db, env.pwfile, endpoint)
            + repo_block("offsite", offsite, env.pwfile, endpoint)
            + f"""[settings]
metrics_file = "{metrics}"

[jobs.home]
repository = "local"
sources = ["{tree}"]
retention = {{ keep_last = 3 }}
prune = "weekly"
check = {{ every = "weekly", read_data_subset = "50%" }}
copy_to = ["offsite"]
mirror_to = ["{mirror}"]
healthcheck = "{http.url}/ping/home"
notify = {notify}
hooks = {{ before = "echo before:$SAFEHOLD_JOB > {marker}" }}

[jobs.db]
repository = "db"
command = "{dump}"
stdin_filename = "db.sql"
notify = {notify}

[jobs.broken]
repository = "local"
sources = ["{tree}"]
notify = {notify}
hooks = {{ after = "echo about to fail; cat {env.pwfile}; exit 7" }}

[jobs.never]
repository = "local"
sources = ["{tmp_path}/does-not-exist"]
alert_if_no_success = "1h"
notify = {notify}
notify_on = ["success"]
"""
        )
        assert env("config", "check").code == 0
        r = env("run", "home", "db")
        assert r.code == 0, str(r)
        assert marker.read_text() == "before:home\n"
        jobs = {j["name"]: j for j in env.jobs_json()}
        assert jobs["home"]["result"] == "ok" and jobs["db"]["result"] == "ok"
        assert jobs["broken"]["result"] is None and jobs["never"]["last_run"] is None
        assert smtp.mails == [], "no alert for a success unless asked"
        # the command's output is a file of the db repository
        out = tmp_path / "restored-db"
        env.repo_cli(db, "-o", f"s3.endpoint={s3_server.url}", "restore", "latest",
                     "--target", str(out))  # fmt: skip
        assert (out / "db.sql").read_bytes().startswith(b"CREATE TABLE t (x int);\n")
        assert (out / "db.sql").stat().st_size == 24 + 200000
        # the copy (S3) and the mirror (rclone) restore the tree identically
        for url, extra in ((offsite, ["-o", f"s3.endpoint={s3_server.url}"]), (mirror, [])):
            target = tmp_path / f"restored-{len(extra)}"
            r = env.repo_cli(url, *extra, "restore", "latest", "--target", str(target))
            assert r.code == 0, str(r)
            assert compare_trees(tree, target / str(tree).lstrip("/")) == []
        r = env.repo_cli(mirror, "check", "--read-data")
        assert r.code == 0, str(r)
        # health-check pings: start, then success
        pings = [q.path for q in http.requests if q.path.startswith("/ping/")]
        assert pings == ["/ping/home/start", "/ping/home"], pings
        # a second run copies and mirrors nothing new and reports it in the log
        r = env("run", "home")
        assert r.code == 0, str(r)
        tail = env.history("home")[0]["log_tail"]
        assert any("copy to offsite: 1 snapshots copied, 1 there already" in t for t in tail), tail
        assert any("mirror to rclone:" in t for t in tail), tail

        # a failing job: email and webhook with the job, the host and the log tail, no secret
        r = env("run", "broken")
        assert r.code == 2 and "after hook" in r.err, str(r)
        smtp.wait_for(1, timeout=30)
        mail = smtp.mails[0]
        body = mail.text()
        assert "broken" in mail.subject and "FAILED" in mail.subject, mail.subject
        assert "about to fail" in body and "status 7" in body, body
        assert PASSWORD not in body and "***" in body
        log = Path(env.history("broken")[0]["log_path"])
        assert PASSWORD not in log.read_text() and "***" in log.read_text()
        hooks = [q for q in http.requests if q.path == "/hook"]
        deadline = time.time() + 30
        while not hooks and time.time() < deadline:
            time.sleep(0.1)
            hooks = [q for q in http.requests if q.path == "/hook"]
        assert len(hooks) == 1, http.requests
        posted = json.dumps(hooks[0].json())
        assert "broken" in posted and "about to fail" in posted and PASSWORD not in posted

        # metrics for every job
        text = metrics.read_text()
        assert 'safehold_job_last_success_timestamp_seconds{job="home"}' in text
        assert 'safehold_job_last_result{job="broken",result="failed"} 1' in text

        # the dead man's switch: "never" has not succeeded within an hour of appearing
        h = History(env.state)
        h.seen("never", time.time() - 7200)
        h.close()
        mails = len(smtp.mails)
        r = env("jobs", "--check")
        assert r.code == 2 and "never" in r.err, str(r)
        smtp.wait_for(mails + 1, timeout=30)
        assert "never" in smtp.mails[-1].subject
        assert "never succeeded" in smtp.mails[-1].text()
    assert os.path.exists(env.state / "history.sqlite")
