"""Alerts and monitoring (safehold.jobs.notify) against real servers: aiosmtpd for email, a
local HTTP server for webhooks and pings, /bin/sh for command targets."""

from __future__ import annotations

import datetime as dt
import logging
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.jobs import notify
from safehold.jobs.notify import JobMetrics, Message
from tests.jobs.servers import (
    HTTPCapture,
    SMTPCapture,
    free_port,
    http_capture,
    silent_port,
    smtp_capture,
)

PASSWORD = "s3cr3t-pw"
REPO_SECRET = "repo-Passw0rd-xyz"


@pytest.fixture
def http() -> Iterator[HTTPCapture]:
    with http_capture() as h:
        yield h


@pytest.fixture
def smtp_tls(tmp_path: Path) -> Iterator[SMTPCapture]:
    with smtp_capture(tls="starttls", user="alice", password=PASSWORD, cert_dir=tmp_path) as s:
        yield s


def message(result: str = "failed", **kw: object) -> Message:
    fields: dict[str, object] = dict(
        job="home",
        host="laptop",
        result=result,
        summary="the before hook 'pg_dump db' exited with status 3",
        log_tail=["02:30:00 job home started", "pg_dump: connection refused", "LAST-LINE-42"],
        log_path="/var/lib/safehold/logs/home/2024-05-01T023000.log",
        started=dt.datetime(2024, 5, 1, 2, 30, tzinfo=dt.UTC),
        duration_s=83.4,
        extra={},
    )
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)

    def __str__(self) -> str:
        return "\n".join(self.lines)


# -- messages ---------------------------------------------------------------------------------


def test_title_and_body() -> None:
    m = message()
    assert m.title() == "safehold: job home FAILED on laptop"
    assert message("warning").title() == "safehold: job home had WARNINGS on laptop"
    assert message("ok").title() == "safehold: job home OK on laptop"
    assert "NOT SUCCEEDED" in message("no-success").title()
    body = m.body()
    for part in (
        "Job:      home",
        "Host:     laptop",
        "FAILED",
        "exited with status 3",
        "2024-05-01 02:30:00+00:00",
        "1m 23s",
        "/var/lib/safehold/logs/home/2024-05-01T023000.log",
        "Last 3 lines of the log:",
        "  LAST-LINE-42",
    ):
        assert part in body, part
    # one-line title even from hostile names; secrets in extra are not rendered
    odd = message(job="a\nb", extra={"secrets": ["zzz"], "repository": "main"})
    assert "\n" not in odd.title()
    assert "zzz" not in odd.body()
    assert "repository: main" in odd.body()
    # long tails are cut to the last lines
    long = message(log_tail=[f"line {i}" for i in range(500)]).body()
    assert "line 499" in long and "line 399" not in long
    with pytest.raises(ValueError):
        message("exploded")


# -- email ------------------------------------------------------------------------------------


def test_email_starttls_auth_delivers_job_and_log_tail(smtp_tls: SMTPCapture) -> None:
    log = Lines()
    failed = notify.send([smtp_tls.url()], message(), log=log, timeout_s=10)
    assert failed == []
    (mail,) = smtp_tls.wait_for(1)
    assert mail.tls, "STARTTLS was not used"
    assert mail.login == "alice"
    assert smtp_tls.auth_attempts == [("alice", True)]
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.subject == "safehold: job home FAILED on laptop"
    text = mail.text()
    assert "Job:      home" in text
    assert "exited with status 3" in text
    assert "LAST-LINE-42" in text
    assert PASSWORD.encode() not in mail.raw
    assert PASSWORD not in str(log)
    assert "alert sent to mailtos://alice:***@127.0.0.1" in str(log)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_email_implicit_tls(tmp_path: Path) -> None:
    with smtp_capture(tls="ssl", user="bob", password=PASSWORD, cert_dir=tmp_path) as s:
        assert notify.send([s.url()], message("warning"), timeout_s=10) == []
        (mail,) = s.wait_for(1)
    assert mail.tls and mail.login == "bob"
    assert "had WARNINGS" in mail.subject


def test_email_wrong_password_is_a_failure_line(smtp_tls: SMTPCapture) -> None:
    url = smtp_tls.url().replace(PASSWORD, "wrong-Pw-123")
    t0 = time.monotonic()
    failed = notify.send([url], message(), timeout_s=3)
    assert time.monotonic() - t0 < 10
    assert len(failed) == 1
    assert failed[0].startswith(f"mailtos://alice:***@127.0.0.1:{smtp_tls.port}")
    assert "wrong-Pw-123" not in failed[0]
    assert smtp_tls.mails == []


def test_unreachable_smtp_and_http_500_do_not_raise_and_do_not_stop_others(
    http: HTTPCapture, capfd: pytest.CaptureFixture[str]
) -> None:
    http.respond("/broken", 500)
    dead = free_port()
    targets = [
        f"mailtos://carol:{PASSWORD}@127.0.0.1:{dead}?to=a@example.com&from=b@example.com"
        "&mode=starttls",
        f"json://user:{PASSWORD}@127.0.0.1:{http.port}/broken?token=tok-{PASSWORD}",
        "nosuchscheme://whatever",
        http.json_url("/good"),
    ]
    log = Lines()
    # an application that logs to stderr through the root logger hears nothing from apprise
    records: list[logging.LogRecord] = []

    class RootHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root_handler = RootHandler()
    logging.getLogger().addHandler(root_handler)
    t0 = time.monotonic()
    try:
        failed = notify.send(targets, message(), log=log, timeout_s=5)
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert [r for r in records if r.name.startswith("apprise")] == []
    assert any("Connection error" in line for line in log.lines), log.lines
    assert time.monotonic() - t0 < 15
    assert len(failed) == 3, failed
    assert failed[0].startswith(f"mailtos://carol:***@127.0.0.1:{dead}?")
    assert failed[1].startswith(f"json://user:***@127.0.0.1:{http.port}/broken?token=***")
    assert "500" in failed[1]
    assert failed[2].startswith("nosuchscheme://whatever")
    for line in [*failed, *log.lines]:
        assert PASSWORD not in line
    assert sum("alert not delivered" in line for line in log.lines) == 3, log.lines
    paths = [r.path for r in http.wait_for(2)]
    assert paths.count("/good") == 1 and paths.count("/broken") == 1
    # nothing printed, by safehold or by apprise
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_hung_smtp_server_respects_the_timeout() -> None:
    with silent_port() as port:
        url = f"mailto://127.0.0.1:{port}?to=a@example.com&from=b@example.com&mode=insecure"
        t0 = time.monotonic()
        failed = notify.send([url], message(), timeout_s=1)
        elapsed = time.monotonic() - t0
    assert len(failed) == 1 and failed[0].startswith(f"mailto://127.0.0.1:{port}")
    assert elapsed < 5, elapsed


def test_hung_webhook_respects_the_timeout(http: HTTPCapture) -> None:
    http.delay_s = 6
    t0 = time.monotonic()
    failed = notify.send([http.json_url()], message(), timeout_s=1)
    assert time.monotonic() - t0 < 4.5
    assert len(failed) == 1


# -- webhook ----------------------------------------------------------------------------------


def test_webhook_json_post(http: HTTPCapture) -> None:
    failed = notify.send([http.json_url("/hook")], message(), timeout_s=10)
    assert failed == []
    (req,) = http.wait_for(1)
    assert req.method == "POST" and req.path == "/hook"
    payload = req.json()
    assert payload["title"] == "safehold: job home FAILED on laptop"
    assert payload["type"] == "failure"
    assert "Job:      home" in payload["message"]
    assert "LAST-LINE-42" in payload["message"]


@pytest.mark.parametrize(
    ("result", "kind"), [("warning", "warning"), ("ok", "success"), ("no-success", "failure")]
)
def test_webhook_type_follows_result(http: HTTPCapture, result: str, kind: str) -> None:
    assert notify.send([http.json_url()], message(result), timeout_s=10) == []
    assert http.wait_for(1)[0].json()["type"] == kind


def test_secrets_are_scrubbed_from_everything_sent(http: HTTPCapture, tmp_path: Path) -> None:
    m = message(
        summary=f"cannot open repository with password {REPO_SECRET}",
        log_tail=[f"password={REPO_SECRET}", "LAST-LINE-42"],
        extra={"secrets": [REPO_SECRET]},
    )
    out = tmp_path / "cmd.out"
    failed = notify.send(
        [http.json_url(), f"command:cat > {out}", f"command:echo {REPO_SECRET}; exit 1"],
        m,
        timeout_s=10,
    )
    (req,) = http.wait_for(1)
    assert REPO_SECRET not in req.text()
    assert "password=***" in req.json()["message"]
    assert REPO_SECRET not in out.read_text()
    assert "LAST-LINE-42" in out.read_text()
    assert len(failed) == 1 and REPO_SECRET not in failed[0]
    assert "***" in failed[0]


# -- command targets --------------------------------------------------------------------------


def test_command_gets_environment_and_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = f'cat > {out}.body; env | grep "^SAFEHOLD_" | sort > {out}.env'
    assert notify.send([f"command:{cmd}"], message(), timeout_s=10) == []
    env = dict(line.split("=", 1) for line in Path(f"{out}.env").read_text().splitlines())
    names = ("SAFEHOLD_HOST", "SAFEHOLD_JOB", "SAFEHOLD_LOG", "SAFEHOLD_RESULT", "SAFEHOLD_TITLE")
    assert {k: v for k, v in env.items() if k in names} == {
        "SAFEHOLD_HOST": "laptop",
        "SAFEHOLD_JOB": "home",
        "SAFEHOLD_LOG": "/var/lib/safehold/logs/home/2024-05-01T023000.log",
        "SAFEHOLD_RESULT": "failed",
        "SAFEHOLD_TITLE": "safehold: job home FAILED on laptop",
    }
    body = Path(f"{out}.body").read_text()
    assert body == message().body()


def test_command_failures(tmp_path: Path) -> None:
    log = Lines()
    marker = tmp_path / "after"
    t0 = time.monotonic()
    failed = notify.send(
        [
            "command:echo cannot page >&2; exit 7",
            "command:   ",
            # the background sleep keeps the pipe open: it must be killed with the shell
            "command:sleep 30 & sleep 30",
            f"command:touch {marker}",
        ],
        message(),
        log=log,
        timeout_s=1,
    )
    assert time.monotonic() - t0 < 8
    assert failed[0] == "command:echo cannot page >&2; exit 7: exited with status 7: cannot page"
    assert failed[1].startswith("command:") and "no command" in failed[1]
    assert failed[2] == "command:sleep 30 & sleep 30: timed out after 1s"
    assert len(failed) == 3
    assert marker.exists()


# -- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mailtos://user:pw@smtp.example.com", "mailtos://user:***@smtp.example.com"),
        (
            "mailtos://me%40x.org:p%40ss@smtp.x.org:587?to=a@b.c&mode=starttls",
            "mailtos://me%40x.org:***@smtp.x.org:587?to=a@b.c&mode=starttls",
        ),
        ("json://monitor.lan/hook", "json://monitor.lan/hook"),
        ("jsons://u:p@h:8443/x?a=1#frag", "jsons://u:***@h:8443/x?a=1#***"),
        (
            "json://h/hook?token=abc&apikey=k1&api_key=k2&password=p&pass=q&secret=s&to=x",
            "json://h/hook?token=***&apikey=***&api_key=***&password=***&pass=***&secret=***&to=x",
        ),
        ("json://h/?:X-Auth-Token=abc", "json://h/?:X-Auth-Token=***"),
        (
            "discord://1234567890123/AbCdEfGh12345678IjKlMnOp",
            "discord://1234567890123/***",
        ),
        ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/-100123", "tgram://***/-100123"),
        (
            "https://hc-ping.com/8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e",
            "https://hc-ping.com/***",
        ),
        ("mailto://user@host", "mailto://user@host"),
        ("mailto://user:@host", "mailto://user:@host"),
        ("not a url", "not a url"),
        ("command:notify-send hi", "command:notify-send hi"),
        (
            "command:curl -s https://u:pw@h/x?token=t",
            "command:curl -s https://u:***@h/x?token=***",
        ),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert notify.redact(url) == shown


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("password is hunter2!", ["hunter2"], "password is ***!"),
        ("a hunter2 b hunter2", ["hunter2"], "a *** b ***"),
        ("url p%40ss here", ["p@ss"], "url *** here"),
        ("abcdef", ["abc", "abcdef"], "***"),
        ("nothing here", [], "nothing here"),
        ("nothing here", [""], "nothing here"),
        ("two: s1 and s2", ["s1", "s2"], "two: *** and ***"),
    ],
)
def test_scrub(text: str, secrets: list[str], expected: str) -> None:
    assert notify.scrub(text, secrets) == expected


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("mailtos://u:p@smtp.example.com?to=a@example.com", True),
        ("json://monitor.lan/hook", True),
        ("jsons://monitor.lan:8443/hook", True),
        ("command:logger safehold", True),
        ("command:", False),
        ("command:   ", False),
        ("", False),
        ("nosuchscheme://x", False),
        ("monitor.lan/hook", False),
    ],
)
def test_validate_target(target: str, ok: bool, capfd: pytest.CaptureFixture[str]) -> None:
    why = notify.validate_target(target)
    assert (why is None) == ok, why
    if why is not None:
        assert "\n" not in why
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (f"nosuchscheme://u:{PASSWORD}@h", "apprise has no service nosuchscheme://"),
        (f"mailtos://u:{PASSWORD}@smtp.example.com?mode=bogus", "(bogus) is invalid"),
        ("discord://abc", "Discord Webhook Token"),
        ("hello", "expected an apprise URL"),
    ],
)
def test_validate_target_says_why_and_hides_password(target: str, reason: str) -> None:
    why = notify.validate_target(target)
    assert why is not None and reason in why, why
    assert PASSWORD not in why
    # apprise's own masking (first and last letters) must not leak either
    assert "s...w" not in why
    if "@" in target:
        assert "u:***@" in why


# -- dead man's switch ------------------------------------------------------------------------

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
LIMIT = 36 * 3600.0


@pytest.mark.parametrize(
    ("case", "now", "last_success", "last_alert", "expected"),
    [
        ("never ran, just appeared", T0 + H, None, None, False),
        ("never ran, just under the limit", T0 + 35 * H, None, None, False),
        ("never ran, limit reached", T0 + 36 * H, None, None, True),
        ("never ran, long ago", T0 + 1000 * H, None, None, True),
        ("succeeded recently", T0 + 100 * H, T0 + 90 * H, None, False),
        ("succeeded long ago", T0 + 200 * H, T0 + 90 * H, None, True),
        ("alerted already in this silence", T0 + 40 * H, None, T0 + 37 * H, False),
        ("alerted at the deadline", T0 + 40 * H, None, T0 + 36 * H, False),
        ("realert after another limit", T0 + 73 * H, None, T0 + 37 * H, True),
        ("not yet another limit", T0 + 72 * H, None, T0 + 37 * H, False),
        ("alert from an earlier silence", T0 + 140 * H, T0 + 100 * H, T0 + 80 * H, True),
        ("earlier alert, new silence not due", T0 + 120 * H, T0 + 100 * H, T0 + 80 * H, False),
    ],
)
def test_overdue(
    case: str,
    now: dt.datetime,
    last_success: dt.datetime | None,
    last_alert: dt.datetime | None,
    expected: bool,
) -> None:
    assert notify.overdue(now, T0, last_success, LIMIT, last_alert) is expected, case


def test_overdue_walk_alerts_once_per_limit() -> None:
    """A job that never succeeds, checked every hour for 10 days: alerts at 36h, 72h, ..."""
    last_alert = None
    alerts = []
    for hour in range(240):
        now = T0 + hour * H
        if notify.overdue(now, T0, None, LIMIT, last_alert):
            alerts.append(hour)
            last_alert = now
    assert alerts == [36, 72, 108, 144, 180, 216]


# -- Prometheus textfile ----------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_metrics(
    text: str,
) -> tuple[dict[str, tuple[str, str]], list[tuple[str, dict[str, str], float]]]:
    """A small parser for the text exposition format: (name → (help, type), samples)."""
    meta: dict[str, list[str]] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[0] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            meta.setdefault(name, ["", ""])[1] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            labels = {}
            raw = m.group(2) or ""
            pos = 0
            while pos < len(raw):
                lm = _LABEL.match(raw, pos)
                assert lm, f"bad labels in {line!r}"
                value = re.sub(
                    r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), lm.group(2)
                )
                labels[lm.group(1)] = value
                pos = lm.end()
            samples.append((m.group(1), labels, float(m.group(3))))
    return {k: (v[0], v[1]) for k, v in meta.items()}, samples


def test_metrics_file_parses_back(tmp_path: Path) -> None:
    path = tmp_path / "safehold.prom"
    rows = [
        JobMetrics("home", 1714530600.0, 1714530600.5, "ok", 83.25, 1234, 10_000_000, 7),
        JobMetrics('we"ird\\job\nname', None, 1714531000.0, "failed", 2.0, None, None, None),
        JobMetrics("fresh", None, None, None, None, None, None, None),
        JobMetrics("busy", 1.0, 2.0, "skipped", 0.0, 0, 0, 0),
    ]
    notify.write_metrics(path, rows)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safehold.prom"]
    meta, samples = parse_metrics(path.read_text())
    expected_families = {
        "safehold_job_last_success_timestamp_seconds",
        "safehold_job_last_run_timestamp_seconds",
        "safehold_job_last_result",
        "safehold_job_duration_seconds",
        "safehold_job_bytes_added",
        "safehold_repository_bytes",
        "safehold_job_files_new",
    }
    assert set(meta) == expected_families
    assert all(kind == "gauge" and help_text for help_text, kind in meta.values())

    def get(name: str, **labels: str) -> float | None:
        found = [v for n, lab, v in samples if n == name and lab == labels]
        assert len(found) <= 1
        return found[0] if found else None

    assert get("safehold_job_last_success_timestamp_seconds", job="home") == 1714530600.0
    assert get("safehold_job_last_run_timestamp_seconds", job="home") == 1714530600.5
    assert get("safehold_job_duration_seconds", job="home") == 83.25
    assert get("safehold_job_bytes_added", job="home") == 1234
    assert get("safehold_repository_bytes", job="home") == 10_000_000
    assert get("safehold_job_files_new", job="home") == 7
    assert get("safehold_job_last_result", job="home", result="ok") == 1
    assert get("safehold_job_last_result", job="home", result="failed") == 0
    weird = 'we"ird\\job\nname'
    assert get("safehold_job_last_result", job=weird, result="failed") == 1
    assert get("safehold_job_last_result", job=weird, result="ok") == 0
    assert get("safehold_job_last_success_timestamp_seconds", job=weird) is None
    assert get("safehold_job_last_run_timestamp_seconds", job=weird) == 1714531000.0
    assert not [s for s in samples if s[1].get("job") == "fresh"]
    assert get("safehold_job_last_result", job="busy", result="skipped") == 1
    assert get("safehold_job_last_result", job="busy", result="ok") == 0

    # rewriting replaces the file whole
    notify.write_metrics(path, rows[:1])
    _, again = parse_metrics(path.read_text())
    assert {s[1]["job"] for s in again} == {"home"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safehold.prom"]


def test_metrics_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "is-a-dir.prom"
    target.mkdir()
    with pytest.raises(OSError):
        notify.write_metrics(target, [JobMetrics("a", 1.0, 1.0, "ok", 1.0, 1, 1, 1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["is-a-dir.prom"]
    with pytest.raises(OSError):
        notify.write_metrics(tmp_path / "missing" / "x.prom", [])


# -- health-check pings -----------------------------------------------------------------------


def test_ping_start_success_fail(http: HTTPCapture) -> None:
    base = f"{http.url}/ping/8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e"
    assert notify.ping(base, "start", timeout_s=5)
    assert notify.ping(base, "success", body="all good\n", timeout_s=5)
    big = "x" * 20_000 + "\nTAIL-END"
    assert notify.ping(base + "/", "fail", body=big, timeout_s=5)
    reqs = http.wait_for(3)
    assert [(r.method, r.path) for r in reqs] == [
        ("POST", "/ping/8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e/start"),
        ("POST", "/ping/8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e"),
        ("POST", "/ping/8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e/fail"),
    ]
    assert reqs[1].text() == "all good\n"
    assert len(reqs[2].body) == 10 * 1024
    assert reqs[2].text().endswith("TAIL-END")
    with pytest.raises(ValueError):
        notify.ping(base, "finish")


def test_ping_failures_are_logged_not_raised(http: HTTPCapture) -> None:
    uuid = "8f2e1c3a-6b1d-4f63-9a1a-0c9bb33f1a2e"
    http.respond(f"/ping/{uuid}/fail", 500)
    log = Lines()
    assert not notify.ping(f"{http.url}/ping/{uuid}", "fail", log=log, timeout_s=5)
    assert not notify.ping(f"http://127.0.0.1:{free_port()}/x", "start", log=log, timeout_s=2)
    assert not notify.ping("not a url", "success", log=log, timeout_s=2)
    with silent_port() as port:
        t0 = time.monotonic()
        assert not notify.ping(f"http://127.0.0.1:{port}/x", "success", log=log, timeout_s=1)
        assert time.monotonic() - t0 < 4
    assert len(log.lines) == 4, log.lines
    assert "HTTP 500" in log.lines[0]
    assert f"{http.url}/ping/***/fail" in log.lines[0]
    assert uuid not in str(log)
