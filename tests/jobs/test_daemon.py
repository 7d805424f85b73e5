"""safehold daemon: schedules, one catch-up after downtime, SIGTERM at a safe point, SIGHUP
reload, and the dead man's switch (with an injected clock)."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from safehold.jobs.daemon import Daemon
from safehold.jobs.history import History
from tests.jobs.jobenv import JobEnv, repo_block


@pytest.fixture
def env(tmp_path: Path) -> JobEnv:
    e = JobEnv(tmp_path)
    os.environ["SAFEHOLD_STATE_DIR"] = str(e.state)
    yield e  # type: ignore[misc]
    os.environ.pop("SAFEHOLD_STATE_DIR", None)


def _job_file(env: JobEnv, repo: Path, src: Path, extra: str) -> None:
    env.write(
        repo_block("main", str(repo), env.pwfile)
        + f'[jobs.home]\nrepository = "main"\nsources = ["{src}"]\n{extra}'
    )


def _src(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    return src


def test_one_catch_up_run_after_downtime_then_the_schedule(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    _job_file(env, repo, _src(tmp_path), 'schedule = "daily 02:00"\n')
    now = time.time()
    env.state.mkdir(parents=True, exist_ok=True)
    h = History(env.state)
    h.seen("home", now - 5 * 86400)  # known for five days, never ran: five runs were missed
    h.close()
    d = Daemon(env.config, env.state, tick_s=0.05)
    outs = d.run(max_runs=1)
    assert [o.result for o in outs] == ["ok"]
    runs = History(env.state).runs("home")
    assert [r.trigger for r in runs] == ["catch-up"], "one run, not one per missed day"
    nxt = d.next_runs()["home"]
    assert now < nxt <= now + 86400 + 60
    assert time.localtime(nxt).tm_hour == 2 and time.localtime(nxt).tm_min == 0


def test_schedule_is_followed_on_an_accelerated_clock(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    _job_file(env, repo, _src(tmp_path), 'schedule = "*/30 * * * *"\n')
    base = time.time()
    m0 = time.monotonic()

    def clock() -> float:  # one real second is five minutes
        return base + (time.monotonic() - m0) * 300

    d = Daemon(env.config, env.state, clock=clock, tick_s=0.02)
    outs = d.run(max_runs=3)
    assert [o.result for o in outs] == ["ok"] * 3
    starts = sorted(r.started for r in History(env.state).runs("home"))
    for t in starts:
        minute = time.localtime(t).tm_min
        assert minute in (0, 1, 2, 30, 31, 32), f"ran at minute {minute}"
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(25 * 60 < g < 35 * 60 for g in gaps), gaps


def test_dead_mans_switch_fires_once_per_silence(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    alerts = tmp_path / "alerts.txt"
    _job_file(
        env,
        repo,
        _src(tmp_path),
        'schedule = "monthly 1 03:00"\nalert_if_no_success = "1h"\n'
        f'notify = ["command:cat >> {alerts}; echo $SAFEHOLD_RESULT >> {alerts}"]\n',
    )
    t = [time.time()]
    env.state.mkdir(parents=True, exist_ok=True)
    h = History(env.state)
    h.seen("home", t[0] - 1800)  # seen half an hour ago: not overdue yet
    h.close()
    stop = threading.Event()
    d = Daemon(env.config, env.state, clock=lambda: t[0], stop=stop, tick_s=0.02)
    th = threading.Thread(target=d.run)
    th.start()
    time.sleep(0.5)
    assert not alerts.exists()
    t[0] += 3600  # now 1.5 h without success: one alert
    time.sleep(0.5)
    t[0] += 600  # still the same silence: no second alert
    time.sleep(0.5)
    stop.set()
    th.join(30)
    text = alerts.read_text()
    assert text.count("no-success") == 1, text
    assert "home" in text and "never succeeded" in text
    # cron users: safehold jobs --check alerts (exit 2), once per silence
    alerts.unlink()
    state2 = tmp_path / "state2"
    h = History(state2)
    h.seen("home", time.time() - 7200)
    h.close()
    r = env("jobs", "--check", env={"SAFEHOLD_STATE_DIR": str(state2)})
    assert r.code == 2 and "never succeeded" in r.err, str(r)
    assert alerts.read_text().count("no-success") == 1
    r = env("jobs", "--check", env={"SAFEHOLD_STATE_DIR": str(state2)})
    assert r.code == 2, str(r)
    assert alerts.read_text().count("no-success") == 1
    # a success ends the silence
    assert env("run", env={"SAFEHOLD_STATE_DIR": str(state2)}).code == 0
    r = env("jobs", "--check", env={"SAFEHOLD_STATE_DIR": str(state2)})
    assert r.code == 0, str(r)


def _wait_for(cond: object, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_sigterm_stops_a_running_backup_at_a_safe_point(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"big{i}.bin").write_bytes(os.urandom(16 << 20))
    _job_file(env, repo, src, 'schedule = "daily 00:00"\n')
    env.state.mkdir(parents=True, exist_ok=True)
    h = History(env.state)
    h.seen("home", time.time() - 3 * 86400)
    h.close()
    proc = env.popen("daemon")
    _wait_for(lambda: len(list((repo / "data").rglob("*"))) > 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "daemon stopped" in err, err
    assert env.snapshots(str(repo)) == [], "no half snapshot"
    run = env.history("home")[0]
    assert run["result"] == "failed" and "stopped" in run["message"], run
    # the next run reuses what was uploaded
    r = env("--json", "run")
    assert r.code == 0, str(r)
    last = env.history("home")[0]
    assert last["result"] == "ok"
    assert last["bytes_added"] < 12 * (16 << 20) * 0.95, last


def test_sighup_reloads_and_keeps_the_old_file_when_broken(env: JobEnv, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env.init_repo(str(repo))
    src = _src(tmp_path)
    _job_file(env, repo, src, 'schedule = "monthly 1 03:00"\n')
    proc = env.popen("daemon")
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen = bytearray()

    def has(text: str) -> bool:
        chunk = proc.stderr.read() if proc.stderr else None  # type: ignore[union-attr]
        if chunk:
            seen.extend(chunk)
        return text.encode() in seen

    _wait_for(lambda: has("daemon started"))
    env.write(
        env.config.read_text()
        + f'[jobs.second]\nrepository = "main"\nsources = ["{src}"]\nschedule = "hourly"\n'
    )
    proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: has("2 jobs"))
    env.write("this is [ not toml")
    proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: has("reload failed, keeping the previous jobs"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert b"Traceback" not in seen
