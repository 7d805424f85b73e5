"""The jobs file: every problem is reported with its field path, line and value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.errors import UsageError
from safehold.jobs.config import (
    ConfigError,
    check_text,
    load_config,
    locate_lines,
    parse_interval,
)

GOOD = """\
[repositories.main]
url = "/srv/backup/main"
password_file = "/etc/safehold/main.pass"

[repositories.offsite]
url = "s3://bucket/laptop"
password_command = "pass show backup"
options = { "s3.endpoint" = "http://127.0.0.1:9000" }

[jobs.home]
repository = "main"
sources = ["/home/me"]
exclude = ["*.tmp"]
exclude_caches = true
exclude_larger_than = "1G"
schedule = "daily 02:30"
random_delay = "10m"
retention = { keep_daily = 7, keep_weekly = 4, keep_within = "2d" }
prune = "weekly"
check = { every = "weekly", read_data_subset = "5%" }
hooks = { before = "echo before", after = "echo after", on_failure = "echo failed" }
copy_to = ["offsite"]
notify = ["json://127.0.0.1:9/hook"]
alert_if_no_success = "36h"
timeout = "2h"

[jobs.db]
repository = "offsite"
command = "pg_dump mydb"
stdin_filename = "mydb.sql"
schedule = "0 */6 * * *"
"""


def test_a_good_file_loads_with_every_field(tmp_path: Path) -> None:
    p = tmp_path / "safehold.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert set(cfg.repositories) == {"main", "offsite"}
    home = cfg.jobs["home"]
    assert home.sources == ["/home/me"]
    assert home.backup == {
        "exclude": ["*.tmp"],
        "exclude_caches": True,
        "exclude_larger_than": "1G",
    }
    assert home.schedule is not None and home.random_delay_s == 600
    assert home.retention == {"keep_daily": 7, "keep_weekly": 4, "keep_within": "2d"}
    assert home.prune is not None and home.prune.every_s == 7 * 86400
    assert home.check is not None and home.check.options == {"read_data_subset": "5%"}
    assert home.hooks.before == ["echo before"] and home.hooks.on_failure == ["echo failed"]
    assert home.copy_to == ["offsite"] and home.alert_if_no_success_s == 36 * 3600
    assert home.timeout_s == 7200
    db = cfg.jobs["db"]
    assert db.command == "pg_dump mydb" and db.stdin_filename == "mydb.sql"
    assert cfg.repositories["offsite"].options == {"s3.endpoint": "http://127.0.0.1:9000"}
    assert cfg.repositories["offsite"].password.command == "pass show backup"


BROKEN = """\
[repositories.main]
url = "/srv/backup/main"
password_file = "/etc/safehold/main.pass"
pasword_env = "X"

[jobs.photos]
repository = "mian"
sources = ["/home/me/Pictures", "relative/path"]
exclud = ["*.tmp"]
exclude_larger_than = "huge"
schedule = "dayly 02:00"
retention = { keep_daily = -1, keep_wekly = 4 }
prune = "fortnightly"
check = { every = "weekly", read_data_subset = "150%" }
hooks = { before = 3 }
copy_to = ["elsewhere"]
notify = ["notaservice://x"]
timeout = 5
"""


def test_every_problem_is_reported_with_its_line_and_value(tmp_path: Path) -> None:
    _, problems = check_text(BROKEN, tmp_path / "x.toml")
    text = [str(p) for p in problems if p.severity == "error"]
    want = [
        'repositories.main.pasword_env (line 4): unknown field "pasword_env"',
        'jobs.photos.repository (line 7): "mian" is not a repository of this file; '
        'did you mean "main"?',
        'jobs.photos.sources (line 8): "relative/path" is not an absolute path',
        'jobs.photos.exclud (line 9): unknown field "exclud"; did you mean "exclude"?',
        'jobs.photos.exclude_larger_than (line 10): "huge"',
        'jobs.photos.schedule (line 11): "dayly 02:00" is not a schedule; '
        'did you mean "daily 02:00"?',
        "jobs.photos.retention.keep_daily (line 12): -1",
        'jobs.photos.retention.keep_wekly (line 12): unknown field "keep_wekly"; '
        'did you mean "keep_weekly"?',
        'jobs.photos.prune (line 13): "fortnightly" is not an interval',
        'jobs.photos.check.read_data_subset (line 14): "150%"',
        "jobs.photos.hooks.before (line 15): 3 is not a list of strings",
        'jobs.photos.copy_to (line 16): "elsewhere" is not a repository of this file',
        "jobs.photos.notify (line 17):",
        "jobs.photos.timeout (line 18): 5 is not an interval",
    ]
    for w in want:
        assert any(t.startswith(w) for t in text), f"missing {w!r} in:\n" + "\n".join(text)
    assert len(text) == len(want), "\n".join(text)


def test_syntax_error_names_its_line(tmp_path: Path) -> None:
    _, problems = check_text('[jobs.a]\nrepository = "x"\nsources = [\n', tmp_path / "x")
    assert len(problems) == 1 and problems[0].line is not None
    assert "not valid TOML" in problems[0].message
    _, problems = check_text('[jobs.a]\nrepository = "x"\nsources = [1,,]\nx = 1\n', tmp_path / "x")
    assert len(problems) == 1 and problems[0].line == 3, problems
    assert str(problems[0]).startswith("line 3: not valid TOML")


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("36h", 129600),
        ("7d", 604800),
        ("1w", 604800),
        ("90m", 5400),
        ("1d12h", 129600),
        ("daily", 86400),
        ("weekly", 604800),
        ("always", 0),
    ],
)
def test_intervals(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "7x", "h", "1h x", "-1h"])
def test_bad_intervals(text: str) -> None:
    with pytest.raises(UsageError):
        parse_interval(text)


def test_line_locator_handles_dotted_keys_and_inline_tables() -> None:
    lines = locate_lines(
        '[jobs."my job"]\nretention.keep_daily = 3\nhooks = { before = "x", after = "y" }\n'
    )
    assert lines[("jobs", "my job")] == 1
    assert lines[("jobs", "my job", "retention", "keep_daily")] == 2
    assert lines[("jobs", "my job", "hooks", "after")] == 3


def test_load_config_raises_with_the_first_problem_and_a_count(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(BROKEN)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "more problems" in str(e.value) and len(e.value.problems) >= 14


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safehold", *args], capture_output=True, text=True, timeout=60
    )


def test_config_check_cli_exit_codes_and_output(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    r = _cli("--config", str(good), "config", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 jobs, 2 repositories" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN)
    r = _cli("--config", str(bad), "config", "check")
    assert r.returncode == 2
    assert (
        'jobs.photos.schedule (line 11): "dayly 02:00" is not a schedule; did you mean '
        '"daily 02:00"?' in r.stdout
    )
    assert r.stdout.count("error:") == 14
    r = _cli("--json", "--config", str(bad), "config", "check")
    doc = json.loads(r.stdout)
    assert r.returncode == 2 and not doc["ok"] and len(doc["problems"]) >= 14
    r = _cli("--config", str(tmp_path / "missing.toml"), "config", "check")
    assert r.returncode == 2 and "no jobs file" in r.stderr and "Traceback" not in r.stderr


def test_warnings_do_not_fail_the_check(tmp_path: Path) -> None:
    p = tmp_path / "w.toml"
    p.write_text(
        '[repositories.r]\nurl = "/x"\npassword_env = "P"\n'
        '[jobs.j]\nrepository = "r"\nsources = ["/x"]\nretention = { keep_last = 3 }\n'
    )
    r = _cli("--config", str(p), "config", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: jobs.j.retention (line 7): no prune cadence" in r.stdout


def test_found_by_a_stranger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in mirror_to, unchecked compression, ~ in file names, multi-line strings and
    zero intervals: each reported where it is (or expanded), not at run time."""
    monkeypatch.setenv("HOME", str(tmp_path))
    text = """\
[repositories.main]
url = "/srv/main"
password_file = "~/pw"
[repositories.offsite]
url = "/srv/offsite"
password_file = "relative/pw"
[jobs.a]
repository = "main"
sources = ["/x"]
hooks = { before = \"\"\"echo hi
[jobs.b]
schedule = "nonsense"
\"\"\" }
mirror_to = ["ofsite", "main", "rclone:remote:path", "offsite"]
compression = "zip"
compression_for = ["*.txt=bogus"]
exclude_file = ["~/excludes.txt"]
timeout = "always"
[jobs."wéird"]
repository = "main"
sources = ["/", 5]
alert_if_no_success = "0s"
"""
    cfg, problems = check_text(text, tmp_path / "x.toml")
    got = [str(p) for p in problems if p.severity == "error"]
    want = [
        'repositories.offsite.password_file (line 6): "relative/pw" is not an absolute path',
        'jobs.a.mirror_to (line 14): "ofsite" is neither a repository of this file nor a URL',
        'jobs.a.mirror_to (line 14): "main" is the job\'s own repository',
        'jobs.a.compression (line 15): "zip"',
        'jobs.a.compression_for (line 16): ["*.txt=bogus"]',
        'jobs.a.timeout (line 18): "always" must be longer than zero',
        'jobs.wéird (line 19): "wéird" is not a valid job name',
        'jobs.wéird.sources (line 21): ["/", 5] is not a list of strings',
        'jobs.wéird.alert_if_no_success (line 22): "0s" must be longer than zero',
    ]
    for w in want:
        assert any(g.startswith(w) for g in got), f"missing {w!r} in:\n" + "\n".join(got)
    assert len(got) == len(want), "\n".join(got)
    assert cfg.repositories["main"].password.file == str(tmp_path / "pw")
    assert cfg.jobs["a"].backup["exclude_file"] == [str(tmp_path / "excludes.txt")]
