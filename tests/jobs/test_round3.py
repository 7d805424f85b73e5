"""What a second outside tester found: a stuck job must not silence the daemon, a skipped run is
not a success, a server that trickles its answer cannot hang a run, an undelivered dead man's
alert is sent again, failed alerts are in the run's log, and the library names import."""

from __future__ import annotations

import http.server
import os
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.jobs import notify
from safehold.jobs.config import check_text
from safehold.jobs.daemon import Daemon
from safehold.jobs.history import History
from tests.jobs.jobenv import JobEnv, repo_block


@pytest.fixture
def env(tmp_path: Path) -> Iterator[JobEnv]:
    e = JobEnv(tmp_path)
    os.environ["SAFEHOLD_STATE_DIR"] = str(e.state)
    yield e
    os.environ.pop("SAFEHOLD_STATE_DIR", None)


def _src(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text("hello")
    return src


def test_a_stuck_job_delays_neither_other_jobs_nor_the_dead_mans_switch(
    env: JobEnv, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _src(tmp_path)
    alerts = tmp_path / "alerts.txt"
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.stuck]\nrepository = "main"\nsources = ["{src}"]\nschedule = "* * * * *"\n'
        + 'hooks = { before = "sleep 60" }\n'
        + f'[jobs.other]\nrepository = "main"\nsources = ["{src}"]\nschedule = "* * * * *"\n'
        + f'[jobs.watched]\nrepository = "main"\nsources = ["{src}/gone"]\n'
        + f'alert_if_no_success = "2m"\nnotify = ["command:cat >> {alerts}"]\n'
    )
    base, m0 = time.time(), time.monotonic()

    def clock() -> float:  # one real second is a minute
        return base + (time.monotonic() - m0) * 60

    stop = threading.Event()
    d = Daemon(env.config, env.state, clock=clock, stop=stop, tick_s=0.05)
    th = threading.Thread(target=d.run)
    th.start()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if len([o for o in d.outcomes if o.job == "other"]) >= 2 and alerts.exists():
            break
        time.sleep(0.1)
    others = [o.result for o in d.outcomes if o.job == "other"]
    stopped_at = time.monotonic()
    stop.set()
    th.join(60)
    assert not th.is_alive()
    assert others[:2] == ["ok", "ok"], others
    assert "watched" in alerts.read_text()
    assert time.monotonic() - stopped_at < 30, "SIGTERM stops the stuck job's hook too"
    stuck = History(env.state).runs("stuck")
    assert stuck and stuck[0].result == "failed", stuck


def test_a_skipped_run_is_not_a_success(tmp_path: Path) -> None:
    h = History(tmp_path)
    rid = h.start("a", 100.0, "manual", None)
    h.finish(rid, ended=100.0, result="warning", exit_code=1, skipped=1)
    assert h.last_success("a") is None and h.last("a") is None
    assert h.last("a", skipped=True) is not None


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(60):  # one byte every half second: no socket timeout fires
            try:
                self.wfile.write(b"X")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.5)

    def log_message(self, *args: object) -> None:
        pass


def test_a_trickling_server_cannot_hang_a_ping() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ping"
        lines: list[str] = []
        t0 = time.monotonic()
        assert notify.ping(url, "start", log=lines.append, timeout_s=1) is False
        assert time.monotonic() - t0 < 10
        assert any("given up" in line for line in lines), lines
    finally:
        server.shutdown()


def test_an_undelivered_dead_mans_alert_is_sent_again(env: JobEnv, tmp_path: Path) -> None:
    flag = tmp_path / "deliverable"
    alerts = tmp_path / "alerts.txt"
    env.write(
        repo_block("main", str(tmp_path / "repo"), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{tmp_path}"]\n'
        + 'alert_if_no_success = "1h"\n'
        + f'notify = ["command:test -e {flag} && cat >> {alerts}"]\n'
    )
    h = History(env.state)
    h.seen("a", time.time() - 7200)
    h.close()
    r = env("jobs", "--check")
    assert r.code == 2 and not alerts.exists()
    assert "alert not delivered" in r.err, str(r)
    flag.touch()
    assert env("jobs", "--check").code == 2
    assert "never succeeded" in alerts.read_text()
    assert env("jobs", "--check").code == 2
    assert alerts.read_text().count("never succeeded") == 1, "once per silence once delivered"


def test_an_undelivered_alert_is_in_the_runs_log(env: JobEnv, tmp_path: Path) -> None:
    env.write(
        repo_block("main", str(tmp_path / "no-repo"), env.pwfile)
        + f'[jobs.a]\nrepository = "main"\nsources = ["{tmp_path}"]\n'
        + 'notify = ["command:exit 3"]\n'
    )
    assert env("run").code == 2
    run = env.history("a")[0]
    log = Path(run["log_path"]).read_text()
    assert "alert not delivered" in log, log


def test_config_round3(tmp_path: Path) -> None:
    text = (
        "\ufeff"
        '[repositories.r]\nurl = "/x"\npassword_env = "P"\n'
        '[jobs.a]\nrepository = "r"\nsources = ["/x"]\n'
        'healthcheck = "https://user:pw@hc.example/abc"\n'
        'check = { every = "weekly", read_data = true, read_data_subset = "5%" }\n'
        '[jobs.b]\nrepository = "r"\nsources = ["/x"]\nhealthcheck = "https://"\n'
    )
    _, problems = check_text(text, tmp_path / "x.toml")
    got = [str(p) for p in problems if p.severity == "error"]
    assert got == [
        "jobs.a.healthcheck (line 7): a user or password in the URL is not sent: put the token "
        "in the path",
        "jobs.a.check (line 8): give read_data or read_data_subset, not both",
        'jobs.b.healthcheck (line 12): "https://" is not an http(s) URL',
    ], got


def test_library_names_and_history_limit(env: JobEnv, tmp_path: Path) -> None:
    from safehold.jobs import Daemon, History, Runner, load_config

    env.write(repo_block("r", "/x", env.pwfile) + '[jobs.a]\nrepository = "r"\nsources = ["/x"]\n')
    cfg = load_config(str(env.config))
    assert Runner(cfg, str(tmp_path / "st")).state == tmp_path / "st"
    assert History and Daemon
    r = env("jobs", "history", "a", "--limit", "99999999999999999999")
    assert r.code == 2 and "--limit" in r.err and "internal" not in r.err, str(r)
