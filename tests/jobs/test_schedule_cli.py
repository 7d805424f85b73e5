"""``safehold schedule install|remove|show`` from a real jobs file (needs
src/safehold/jobs/config.py, the jobs-file loader)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.jobs.units import MARKER
from tests.conftest import Cli
from tests.support.tools import skip_or_fail

SAFEHOLD = str(Path(sys.executable).parent / "safehold")


def jobs_file(tmp_path: Path, extra: str = "", name: str = "jobs.toml") -> Path:
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "pass").write_text("secret\n")
    path = tmp_path / name
    path.write_text(
        f"""
[repositories.main]
url = "{tmp_path}/repo"
password_file = "{tmp_path}/pass"

[jobs.home]
repository = "main"
sources = ["{tmp_path}/src"]
schedule = "daily 02:30"
random_delay = "30m"

[jobs.docs]
repository = "main"
sources = ["{tmp_path}/src"]
schedule = "weekly mon,thu 04:00"

[jobs.manual]
repository = "main"
sources = ["{tmp_path}/src"]
{extra}"""
    )
    return path


def verify(unit_dir: Path, *, user: bool = False) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip_or_fail("systemd-analyze not installed (Debian package systemd)")
        raise AssertionError("unreachable")
    env = dict(os.environ)
    if user:
        runtime = unit_dir.parent / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    units = sorted(p.name for p in unit_dir.iterdir())
    cmd = [tool, *(["--user"] if user else []), "verify", *units]
    return subprocess.run(cmd, cwd=unit_dir, env=env, capture_output=True, text=True, check=False)


def test_install_dir_writes_units_that_verify(cli: Cli, tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    out = tmp_path / "units"
    r = cli.ok("--config", str(config), "schedule", "install", "--dir", str(out), repo=False)
    assert "job manual has no schedule: skipped" in r.err
    assert sorted(p.name for p in out.iterdir()) == [
        "safehold-docs.service",
        "safehold-docs.timer",
        "safehold-home.service",
        "safehold-home.timer",
    ]
    assert f"wrote {out}/safehold-home.timer" in r.out
    assert "ran " not in r.out  # no systemctl with --dir
    service = (out / "safehold-home.service").read_text()
    # run as `python -m safehold`, the units run the same interpreter and module
    assert f"ExecStart={sys.executable} -m safehold --config {config} run home\n" in service
    timer = (out / "safehold-home.timer").read_text()
    assert timer.startswith(MARKER + "\n")
    assert "OnCalendar=*-*-* 02:30:00\n" in timer and "RandomizedDelaySec=1800\n" in timer
    assert "OnCalendar=Mon,Thu *-*-* 04:00:00\n" in (out / "safehold-docs.timer").read_text()
    res = verify(out)
    assert res.returncode == 0, res.stderr
    # remove: exactly what install wrote
    r = cli.ok("--config", str(config), "schedule", "remove", "--dir", str(out), repo=False)
    assert list(out.iterdir()) == []
    assert r.out.count("removed ") == 4


def test_install_user_units_from_the_console_script(tmp_path: Path, cli: Cli) -> None:
    config = jobs_file(tmp_path)
    out = tmp_path / "units"
    proc = subprocess.run(
        [SAFEHOLD, "--config", str(config), "schedule", "install", "--user", "--dir", str(out),
         "home", "--json"],
        env=cli.env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["written"] == [f"{out}/safehold-home.service", f"{out}/safehold-home.timer"]
    assert report["commands"] == [] and report["removed"] == []
    service = (out / "safehold-home.service").read_text()
    assert f"ExecStart={SAFEHOLD} --config {config} run home\n" in service
    res = verify(out, user=True)
    assert res.returncode == 0, res.stderr


def test_install_cron_dir(cli: Cli, tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    out = tmp_path / "cron"
    cli.ok("--config", str(config), "schedule", "install", "--cron", "--dir", str(out),
           "--exe", SAFEHOLD, repo=False)  # fmt: skip
    lines = (out / "safehold").read_text().splitlines()
    assert lines[0] == MARKER
    assert f"0 4 * * 1,4 root {SAFEHOLD} --config {config} run docs" in lines
    home = next(ln for ln in lines if ln.endswith(" run home"))
    assert home.startswith("30 2 * * * root sleep ")
    cli.ok("--config", str(config), "schedule", "remove", "--cron", "--dir", str(out), "home",
           repo=False)  # fmt: skip
    assert not any(ln.endswith(" run home") for ln in (out / "safehold").read_text().splitlines())
    cli.ok("schedule", "remove", "--cron", "--dir", str(out), repo=False)
    assert not (out / "safehold").exists()


def test_errors(cli: Cli, tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    out = tmp_path / "units"
    r = cli("--config", str(config), "schedule", "install", "--dir", str(out), "nope", repo=False)
    assert r.code == 2 and r.err.strip().splitlines() == [
        f"safehold: no job named 'nope' in {config} (jobs: docs, home, manual)"
    ]
    r = cli("--config", str(config), "schedule", "install", "--dir", str(out), "manual",
            repo=False)  # fmt: skip
    assert r.code == 2 and "no job to install: none has a schedule" in r.err
    r = cli("--config", str(config), "schedule", "install", "--dir", str(out), "--exe",
            str(tmp_path / "missing"), repo=False)  # fmt: skip
    assert r.code == 2 and "not an executable file" in r.err
    r = cli("schedule", "install", "--cron", "--systemd", repo=False)
    assert r.code == 2 and "not allowed with argument" in r.err
    bad = jobs_file(tmp_path, 'schedule = "dayly 02:00"\n', name="bad.toml")
    r = cli("--config", str(bad), "schedule", "install", "--dir", str(out), repo=False)
    assert r.code == 2
    assert '"dayly 02:00" is not a schedule; did you mean "daily 02:00"?' in r.err
    assert "Traceback" not in r.err
    # a foreign file in the way
    out.mkdir(exist_ok=True)
    (out / "safehold-home.timer").write_text("[Timer]\n")
    r = cli("--config", str(config), "schedule", "install", "--dir", str(out), repo=False)
    assert r.code == 2 and "was not written by safehold" in r.err
    r = cli("schedule", "remove", "--dir", str(out), "home", repo=False)
    assert r.code == 2 and "not deleting it" in r.err
    assert (out / "safehold-home.timer").read_text() == "[Timer]\n"


def test_stale_units_are_pointed_out(cli: Cli, tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    out = tmp_path / "units"
    cli.ok("--config", str(config), "schedule", "install", "--dir", str(out), repo=False)
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(config.read_text().replace('schedule = "weekly mon,thu 04:00"\n', ""))
    r = cli.ok("--config", str(smaller), "schedule", "install", "--dir", str(out), repo=False)
    assert "job docs is installed but has no schedule" in r.err
    assert "safehold schedule remove docs" in r.err


def test_show(cli: Cli, tmp_path: Path) -> None:
    config = jobs_file(tmp_path)
    r = cli.ok("--config", str(config), "--json", "schedule", "show", "--count", "2",
               repo=False)  # fmt: skip
    rows = {row["name"]: row for row in json.loads(r.out)}
    assert rows["manual"]["schedule"] is None
    home = rows["home"]
    assert home["description"] == "every day at 02:30"
    assert home["oncalendar"] == ["*-*-* 02:30:00"] and home["cron"] == "30 2 * * *"
    assert len(home["next_runs"]) == 2 and all("T02:30:00" in t for t in home["next_runs"])
    assert home["random_delay_s"] == 1800
    r = cli.ok("--config", str(config), "schedule", "show", "docs", repo=False)
    assert (
        r.out.splitlines()[0] == "docs: weekly mon,thu 04:00 (every Monday and Thursday at 04:00)"
    )


@pytest.mark.skipif(Path("/run/systemd/system").exists(), reason="a real systemd would act")
def test_install_without_dir_reports_systemctl_failure(cli: Cli, tmp_path: Path) -> None:
    """--user without --dir writes to ~/.config/systemd/user (HOME is the test's) and then
    needs systemctl, which fails here (no systemd running): one clear line, exit 2."""
    config = jobs_file(tmp_path)
    r = cli("--config", str(config), "schedule", "install", "--user", "home", repo=False,
            env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})  # fmt: skip
    assert r.code == 2, str(r)
    assert "Traceback" not in r.err
    assert "the unit files were written to" in r.err
    assert (tmp_path / "xdg" / "systemd" / "user" / "safehold-home.timer").exists()
