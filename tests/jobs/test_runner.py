"""safehold run: a job's steps, its result and exit code, its history and log."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from safehold.errors import Interrupted
from safehold.events import Event
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.repository.repo import Repository
from tests.jobs.jobenv import JobEnv, repo_block
from tests.support.treecmp import compare_trees


@pytest.fixture
def env(tmp_path: Path) -> JobEnv:
    return JobEnv(tmp_path)


def _source(root: Path, n: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}.txt").write_bytes(os.urandom(1000 + i * 37))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "deep.bin").write_bytes(os.urandom(300_000))
    return root


def test_run_backs_up_forgets_prunes_checks_and_records(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    marker = tmp_path / "hooks.txt"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f"""[jobs.home]
repository = "main"
sources = ["{src}"]
exclude = ["*.skip"]
retention = {{ keep_last = 2 }}
prune = "always"
check = {{ every = "always", read_data = true }}

[jobs.home.hooks]
before = "echo before:$SAFEHOLD_JOB >> {marker}"
after = "echo after:$SAFEHOLD_RESULT >> {marker}"
"""
    )
    (src / "x.skip").write_text("excluded")
    for i in range(3):
        (src / f"round{i}.txt").write_text(f"round {i}")
        r = env("run")
        assert r.code == 0, str(r)
    assert marker.read_text().splitlines() == ["before:home", "after:ok"] * 3
    snaps = env.snapshots(str(repo))
    assert len(snaps) == 2, "retention keep_last = 2 after three runs"
    assert all("job:home" in s["tags"] for s in snaps)
    runs = env.history("home")
    assert [r["result"] for r in runs] == ["ok"] * 3
    assert runs[0]["snapshot"] == snaps[-1]["id"]
    assert runs[0]["files_new"] == 1 and runs[-1]["files_new"] >= 22
    assert runs[0]["log_tail"] and any("check:" in line for line in runs[0]["log_tail"])
    assert Path(runs[0]["log_path"]).exists()
    # the last snapshot restores the source (without the excluded file)
    out = tmp_path / "restored"
    env.repo_cli(str(repo), "restore", snaps[-1]["id"], "--target", str(out))
    st = src.stat()
    (src / "x.skip").unlink()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert compare_trees(src, out / str(src).lstrip("/")) == []
    jobs = env.jobs_json()
    assert jobs[0]["name"] == "home" and jobs[0]["result"] == "ok"
    assert jobs[0]["last_run"] and jobs[0]["next_run"] is None  # no schedule


def test_missing_source_fails_the_job_and_is_not_skipped(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{src}", "{tmp_path}/gone"]\n'
    )
    r = env("run")
    assert r.code == 2, str(r)
    assert f"source {tmp_path}/gone does not exist" in r.err
    assert env.snapshots(str(repo)) == []
    assert env.history("a")[0]["result"] == "failed"


def test_failing_before_hook_aborts_and_runs_on_failure(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    log = tmp_path / "failure.txt"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f"""[jobs.a]
repository = "main"
sources = ["{src}"]

[jobs.a.hooks]
before = "echo preparing; exit 3"
on_failure = "echo $SAFEHOLD_JOB $SAFEHOLD_RESULT $SAFEHOLD_EXIT_CODE > {log}"
"""
    )
    r = env("run", "a")
    assert r.code == 2, str(r)
    assert "the before hook" in r.err and "exited with status 3" in r.err
    assert env.snapshots(str(repo)) == [], "a failing before hook aborts the backup"
    assert log.read_text().split() == ["a", "failed", "2"]
    tail = env.history("a")[0]["log_tail"]
    assert any("preparing" in line for line in tail), tail


def test_unknown_job_and_broken_file_are_one_line_errors(env: JobEnv, tmp_path: Path) -> None:
    env.write(repo_block("main", "/x", env.pwfile) + '[jobs.a]\nrepository = "main"\n')
    r = env("run")
    assert r.code == 2 and "nothing to back up" in r.err and "Traceback" not in r.err
    env.write(
        repo_block("main", str(tmp_path / "nothing-here"), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{tmp_path}"]\n'
    )
    r = env("run", "b")
    assert r.code == 2 and "no job named 'b'" in r.err
    r = env("run", "a")  # an unreachable repository is a failure at run time
    assert r.code == 2 and "there is no repository" in r.err, str(r)


def test_an_overlapping_run_skips_with_a_warning(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    started = tmp_path / "started"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f"""[jobs.slow]
repository = "main"
sources = ["{src}"]
hooks = {{ before = "touch {started}; sleep 4" }}
"""
    )
    first = env.popen("run", "slow")
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    r = env("run", "slow")
    assert r.code == 1, str(r)
    assert "already running" in r.err
    assert first.wait(60) == 0
    results = [h["result"] for h in env.history("slow")]
    assert sorted(results) == ["ok", "warning"]
    assert any("already running" in (h["message"] or "") for h in env.history("slow"))
    # the lock is the kernel's: a killed run leaves nothing that blocks the next one
    killed = env.popen("run", "slow")
    started.unlink()
    while not started.exists() and time.time() < deadline + 30:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    env.write(env.config.read_text().replace("sleep 4", "true"))
    assert env("run", "slow").code == 0


def test_timeout_stops_a_hanging_job(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.hang]\nrepository = "main"\nsources = ["{src}"]\ntimeout = "2s"\n'
        + 'hooks = { before = "sleep 60" }\n'
    )
    t0 = time.monotonic()
    r = env("run")
    assert r.code == 2, str(r)
    assert time.monotonic() - t0 < 30
    assert "timed out" in r.err
    assert env.history("hang")[0]["result"] == "failed"


def test_command_source_is_backed_up_and_a_failing_command_fails(
    env: JobEnv, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    script = tmp_path / "dump.sh"
    script.write_text("#!/bin/sh\nhead -c 300000 /dev/urandom > $OUT_FILE\ncat $OUT_FILE\n")
    script.chmod(0o755)
    dump = tmp_path / "dump.expected"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f"""[jobs.db]
repository = "main"
command = "OUT_FILE={dump} {script}"
stdin_filename = "db.sql"

[jobs.broken]
repository = "main"
command = "echo partial; exit 5"
"""
    )
    r = env("run", "db")
    assert r.code == 0, str(r)
    out = tmp_path / "r"
    env.repo_cli(str(repo), "restore", "latest", "--target", str(out))
    assert (out / "db.sql").read_bytes() == dump.read_bytes()
    r = env("run", "broken")
    assert r.code == 2 and "status 5" in r.err, str(r)
    assert len(env.snapshots(str(repo))) == 1
    shutil.rmtree(out)


def test_retention_touches_only_the_jobs_own_snapshots(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    # a manual backup of the same folder, and one from another host
    env.repo_cli(str(repo), "backup", str(src))
    env.repo_cli(str(repo), "backup", str(src), "--host", "elsewhere")
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{src}"]\n'
        + 'retention = { keep_last = 1 }\nprune = "always"\n'
        + f'[jobs.b]\nrepository = "main"\nsources = ["{src}"]\ntag = ["mine"]\n'
    )
    assert env("run", "b").code == 0
    for i in range(3):
        (src / f"n{i}").write_text(str(i))
        r = env("run", "a")
        assert r.code == 0, str(r)
    snaps = env.snapshots(str(repo))
    tags = sorted(",".join(sorted(s["tags"])) for s in snaps)
    assert tags == ["", "", "job:a", "job:b,mine"], tags
    assert {s["host"] for s in snaps} >= {"elsewhere"}
    # what was kept still restores after the prunes
    for s in snaps:
        out = tmp_path / f"r-{s['id'][:8]}"
        r = env.repo_cli(str(repo), "restore", s["id"], "--target", str(out), "--verify")
        assert r.code == 0, str(r)


def test_secrets_in_urls_and_passwords_never_reach_logs_history_or_alerts(
    env: JobEnv, tmp_path: Path
) -> None:
    alerts = tmp_path / "alerts.txt"
    notify = f'notify = ["command:cat >> {alerts}"]\n'
    env.cli.env["REPO_PW"] = "env-password-1234"
    env.write(
        '[repositories.sftp]\nurl = "sftp://backup:UrlSecretPw99@127.0.0.1:1/srv/repo"\n'
        f'password_file = "{env.pwfile}"\n'
        '[repositories.envpw]\nurl = "/nonexistent/repo"\npassword_env = "REPO_PW"\n'
        f'[jobs.url]\nrepository = "sftp"\nsources = ["{tmp_path}"]\n{notify}'
        f'mirror_to = ["rclone::s3,access_key_id=AK,secret_access_key=RcSecret123:b/p"]\n'
        f'[jobs.hook]\nrepository = "envpw"\nsources = ["{tmp_path}/missing"]\n{notify}'
        'hooks = { before = "env | grep REPO_PW" }\n'
    )
    assert env("run", "url").code == 2
    assert env("run", "hook").code == 2
    secrets = ["UrlSecretPw99", "RcSecret123", "env-password-1234"]
    texts = {"alerts": alerts.read_text()}
    for job in ("url", "hook"):
        run = env.history(job)[0]
        texts[f"{job} history"] = json.dumps(run)
        texts[f"{job} log"] = Path(run["log_path"]).read_text()
    texts["jobs"] = env("--json", "jobs").out
    assert "REPO_PW=***" in texts["hook log"], texts["hook log"]
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret} in {where}:\n{text}"


def test_a_killed_run_is_closed_and_a_skip_hides_no_result(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    started = tmp_path / "started"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{src}"]\n'
        + f'hooks = {{ before = "touch {started}; sleep 30" }}\n'
    )
    proc = env.popen("run")
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert [j["running"] for j in env.jobs_json()] == [True]
    proc.kill()
    proc.wait()
    jobs = env.jobs_json()
    assert jobs[0]["result"] == "failed" and "interrupted" in jobs[0]["message"], jobs
    assert not jobs[0]["running"]
    # an overlapping run's skip is in the history but is not the job's result
    env.write(env.config.read_text().replace("sleep 30", "sleep 3"))
    started.unlink()
    first = env.popen("run")
    while not started.exists() and time.time() < deadline + 30:
        time.sleep(0.05)
    assert env("run").code == 1
    assert first.wait(60) == 0
    assert env.jobs_json()[0]["result"] == "ok"
    assert [r["result"] for r in env.history("a")] == ["warning", "ok", "failed"]


def test_a_hanging_password_command_obeys_the_timeout(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _source(tmp_path / "src")
    env.write(
        f'[repositories.r]\nurl = "{repo}"\npassword_command = "sleep 60; cat {env.pwfile}"\n'
        f'[jobs.a]\nrepository = "r"\nsources = ["{src}"]\ntimeout = "2s"\n'
    )
    t0 = time.monotonic()
    r = env("run")
    assert r.code == 2 and "timed out after 2s" in r.err, str(r)
    assert time.monotonic() - t0 < 20


def test_a_dangling_symlink_source_fails(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    (tmp_path / "mnt").symlink_to(tmp_path / "unmounted-disk")
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{tmp_path}/mnt"]\n'
    )
    r = env("run")
    assert r.code == 2 and "which is missing" in r.err, str(r)
    assert env.snapshots(str(repo)) == []


def test_check_read_data_stops_between_packs(repo: Repository, tmp_path: Path) -> None:
    """A job's timeout or SIGTERM reaches a long check: it stops after the pack it reads."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(12 << 20))
    backup(repo, BackupOptions(paths=[str(src)]))
    stop = threading.Event()
    read: list[int] = []

    def events(ev: Event) -> None:
        if ev.kind == "progress" and "packs_done" in ev.data:
            read.append(ev.data["packs_done"])
            stop.set()

    with pytest.raises(Interrupted):
        check(repo, CheckOptions(read_data=True, workers=1), events=events, stop=stop)
    assert read == [1], read
    assert check(repo, CheckOptions(read_data=True)).ok
