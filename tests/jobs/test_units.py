"""systemd units and cron files for scheduled jobs: rendered text, ``systemd-analyze verify``
on what ``install`` writes, quoting through the real shell, and install/remove bookkeeping
(only files safehold wrote are replaced or deleted)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safehold.errors import UsageError
from safehold.jobs.schedule import parse_schedule
from safehold.jobs.units import (
    CRON_BEGIN,
    CRON_END,
    MARKER,
    ScheduledJob,
    ScheduleInstallError,
    check_job_name,
    install,
    installed_jobs,
    merge_crontab,
    remove,
    render_cron,
    render_systemd,
    split_crontab,
)
from tests.support.tools import skip_or_fail

SAFEHOLD = str(Path(sys.executable).parent / "safehold")  # the venv's console script


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip_or_fail("systemd-analyze not installed (Debian package systemd)")
        raise AssertionError("unreachable")
    return tool


def verify(unit_dir: Path, *, user: bool = False) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze [--user] verify`` on every unit in ``unit_dir`` (run there, so the
    service a timer names is found next to it)."""
    units = sorted(p.name for p in unit_dir.iterdir() if p.suffix in (".service", ".timer"))
    env = dict(os.environ)
    if user:
        runtime = unit_dir.parent / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
    cmd = [analyze(), *(["--user"] if user else []), "verify", *units]
    return subprocess.run(cmd, cwd=unit_dir, env=env, capture_output=True, text=True, check=False)


JOBS = [
    ScheduledJob("home", parse_schedule("daily 02:30"), 1800.0),
    ScheduledJob("db.dump-2", parse_schedule("0 4 13 * fri")),
    ScheduledJob("month_end", parse_schedule("monthly last 23:00"), 0.4),
    ScheduledJob("often", parse_schedule("*/15 * * * *")),
]


def test_render_systemd_text() -> None:
    service, timer = render_systemd(
        "home",
        parse_schedule("weekly mon,thu 04:00"),
        exe=SAFEHOLD,
        config_path="/etc/safehold/safehold.toml",
        random_delay_s=1800,
        user=False,
    )
    assert service.splitlines()[0] == MARKER
    assert "Type=oneshot\n" in service
    assert f"ExecStart={SAFEHOLD} --config /etc/safehold/safehold.toml run home\n" in service
    assert "Nice=10\n" in service and "IOSchedulingClass=idle\n" in service
    assert timer.splitlines()[0] == MARKER
    assert "OnCalendar=Mon,Thu *-*-* 04:00:00\n" in timer
    assert "Persistent=true\n" in timer
    assert "RandomizedDelaySec=1800\n" in timer
    assert "Unit=safehold-home.service\n" in timer
    assert timer.endswith("[Install]\nWantedBy=timers.target\n")
    # no delay, no setting; the either-day rule gives two OnCalendar lines
    _, timer = render_systemd(
        "x", parse_schedule("0 0 13 * fri"), exe=SAFEHOLD, config_path=None,
        random_delay_s=0, user=True,
    )  # fmt: skip
    assert "RandomizedDelaySec" not in timer
    assert re.findall("^OnCalendar=.*$", timer, re.M) == [
        "OnCalendar=Fri *-*-* 00:00:00",
        "OnCalendar=*-*-13 00:00:00",
    ]


def test_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    out = tmp_path / "units"
    changes = install(JOBS, exe=SAFEHOLD, config_path=str(tmp_path / "jobs.toml"), dir=out)
    assert sorted(p.name for p in changes.written) == sorted(
        f"safehold-{j.name}.{k}" for j in JOBS for k in ("service", "timer")
    )
    assert changes.commands == []  # --dir runs no systemctl
    for p in changes.written:
        assert p.stat().st_mode & 0o777 == 0o644
    res = verify(out)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "safehold-" not in res.stderr, res.stderr  # no warning about our units


def test_user_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    out = tmp_path / "units"
    install(JOBS, exe=SAFEHOLD, config_path=None, dir=out, user=True)
    assert "network-online" not in (out / "safehold-home.service").read_text()
    res = verify(out, user=True)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "safehold-" not in res.stderr, res.stderr


def test_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The verify check can fail: a unit naming a missing executable is rejected."""
    out = tmp_path / "units"
    install(JOBS[:1], exe=str(tmp_path / "no-such-safehold"), config_path=None, dir=out)
    res = verify(out)
    assert res.returncode != 0
    assert "no-such-safehold" in res.stderr


def test_exec_start_quoting_survives_systemd(tmp_path: Path) -> None:
    """An executable path with spaces, % and $: verify finds the file only if systemd unquotes
    the path exactly (no variables are expanded in the executable name, specifiers are)."""
    odd = tmp_path / "my bin %h $HOME"
    odd.mkdir()
    exe = odd / "safehold"
    exe.symlink_to(SAFEHOLD)
    out = tmp_path / "units"
    config = str(tmp_path / "jobs 100% $HOME 'q\" \\.toml")
    install(JOBS[:1], exe=str(exe), config_path=config, dir=out)
    service = (out / "safehold-home.service").read_text()
    exec_start = next(ln for ln in service.splitlines() if ln.startswith("ExecStart="))
    quoted_exe = '"' + f"{odd}/safehold".replace("%", "%%") + '"'
    quoted_config = str(tmp_path).replace("%", "%%") + "/jobs 100%% $$HOME 'q\\\" \\\\.toml"
    assert exec_start == f'ExecStart={quoted_exe} --config "{quoted_config}" run home'
    res = verify(out)
    assert res.returncode == 0, res.stderr + res.stdout
    # and the check can fail: the path with an unescaped specifier names no file
    (out / "safehold-home.service").write_text(service.replace("%%h", "%h"))
    assert verify(out).returncode != 0


def test_executables_systemd_cannot_run_are_refused(tmp_path: Path) -> None:
    for bad in ("/opt/it's/safehold", '/opt/a"b/safehold', "/opt/a\\b/safehold"):
        with pytest.raises(UsageError, match="quotes or backslashes"):
            render_systemd("home", parse_schedule("daily"), exe=bad, config_path=None,
                           random_delay_s=0, user=False)  # fmt: skip


def test_job_names_are_restricted() -> None:
    for ok in ("home", "db.dump-2", "A_1", "x" * 100):
        assert check_job_name(ok) == ok
    for bad in ("", "-rf", ".hidden", "a b", "a/b", "ä", "x;rm", "a\nb", "x" * 101, "a@b"):
        with pytest.raises(UsageError, match="not allowed"):
            check_job_name(bad)
    with pytest.raises(UsageError):
        render_systemd("a b", parse_schedule("daily"), exe=SAFEHOLD, config_path=None,
                       random_delay_s=0, user=False)  # fmt: skip
    with pytest.raises(UsageError, match="absolute"):
        render_systemd("a", parse_schedule("daily"), exe="safehold", config_path=None,
                       random_delay_s=0, user=False)  # fmt: skip


# --- cron ------------------------------------------------------------------------------------


def _cron_command(line: str, *, user: bool) -> str:
    """The shell command of a cron line, as cron hands it to /bin/sh (``\\%`` -> ``%``)."""
    fields = line.split(None, 5 if user else 6)
    command = fields[5] if user else fields[6]
    if not user:
        assert fields[5] == "root"
    assert "%" not in command.replace("\\%", "")  # an unescaped % would become a newline
    return command.replace("\\%", "%")


def test_render_cron_system_file() -> None:
    text = render_cron(
        [(j.name, j.schedule) for j in JOBS],
        exe=SAFEHOLD,
        config_path="/etc/safehold/safehold.toml",
        user=False,
        random_delays={"home": 1800},
    )
    lines = text.splitlines()
    assert lines[0] == MARKER
    assert "SHELL=/bin/sh" in lines
    jobs = [ln for ln in lines if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(jobs) == 4
    by_job = {ln.rsplit(" run ", 1)[1]: ln for ln in jobs}
    assert by_job["home"].startswith("30 2 * * * root sleep ")
    assert "shuf -i 0-1800 -n 1" in by_job["home"]
    assert by_job["often"].startswith("*/15 * * * * root ")
    assert by_job["db.dump-2"].startswith("0 4 13 * 5 root ")
    month_end = _cron_command(by_job["month_end"], user=False)
    assert by_job["month_end"].startswith("0 23 28-31 * * root ")
    assert month_end.startswith('[ "$(date -d tomorrow +%d)" = 01 ] && ')
    assert "flock" not in text


def test_render_cron_user_block() -> None:
    text = render_cron([("home", parse_schedule("daily 02:30"))], exe=SAFEHOLD,
                       config_path=None, user=True)  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == CRON_BEGIN and lines[-1] == CRON_END and MARKER in lines
    assert f"30 2 * * * {SAFEHOLD} run home" in lines


@pytest.mark.parametrize("user", [False, True])
def test_cron_command_runs_through_the_shell_with_exact_arguments(
    tmp_path: Path, user: bool
) -> None:
    """The command of a cron line, run by the real /bin/sh, passes exactly the intended
    arguments, whatever the paths contain."""
    odd = tmp_path / "a dir 50% $HOME `x` 'q\" \\"
    odd.mkdir()
    record = tmp_path / "argv"
    exe = odd / "safe hold"
    exe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    exe.chmod(0o755)
    config = str(odd / "jobs 100%.toml")
    text = render_cron(
        [("home", parse_schedule("daily 02:30"))],
        exe=str(exe),
        config_path=config,
        user=user,
        random_delays={"home": 1},
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("30 2 "))
    command = _cron_command(line, user=user)
    subprocess.run(["/bin/sh", "-c", command], check=True, timeout=10)
    assert record.read_text().splitlines() == ["--config", config, "run", "home"]


def test_crontab_merge_keeps_other_entries() -> None:
    block = render_cron([("home", parse_schedule("daily"))], exe=SAFEHOLD, config_path=None,
                        user=True)  # fmt: skip
    existing = "MAILTO=me\n0 1 * * * /usr/bin/other\n"
    merged = merge_crontab(existing, block)
    assert merged == existing + block
    rest, found = split_crontab(merged + "5 5 * * * /usr/bin/last\n")
    assert found == block
    assert rest == existing + "5 5 * * * /usr/bin/last\n"
    block2 = render_cron([("docs", parse_schedule("hourly"))], exe=SAFEHOLD, config_path=None,
                         user=True)  # fmt: skip
    assert merge_crontab(merged, block2) == existing + block2  # replaced, not appended
    assert merge_crontab(merged, None) == existing
    assert merge_crontab("0 1 * * * x", block) == "0 1 * * * x\n" + block
    assert merge_crontab("", None) == ""


# --- install / remove with --dir -------------------------------------------------------------


def test_install_and_remove_systemd_dir(tmp_path: Path) -> None:
    out = tmp_path / "units"
    install(JOBS, exe=SAFEHOLD, config_path=None, dir=out)
    foreign = out / "safehold-other.timer"
    foreign.write_text("[Timer]\nOnCalendar=daily\n")
    assert installed_jobs(dir=out) == sorted(j.name for j in JOBS)
    # reinstalling replaces our files
    again = install(JOBS[:1], exe=SAFEHOLD, config_path="/x.toml", dir=out)
    assert len(again.written) == 2
    assert "--config /x.toml run home" in (out / "safehold-home.service").read_text()
    # remove one job, then the rest; the foreign file stays
    changes = remove(["home"], dir=out)
    assert sorted(p.name for p in changes.removed) == [
        "safehold-home.service",
        "safehold-home.timer",
    ]
    assert changes.commands == []
    assert remove(["home"], dir=out).notes == [f"job home: no units in {out}"]
    changes = remove(None, dir=out)
    assert len(changes.removed) == 6
    assert sorted(p.name for p in out.iterdir()) == ["safehold-other.timer"]


def test_files_without_the_marker_are_never_replaced_or_deleted(tmp_path: Path) -> None:
    out = tmp_path / "units"
    out.mkdir()
    mine = out / "safehold-home.timer"
    mine.write_text("[Timer]\nOnCalendar=hourly\n")
    with pytest.raises(ScheduleInstallError, match="was not written by safehold"):
        install(JOBS[:1], exe=SAFEHOLD, config_path=None, dir=out)
    assert mine.read_text() == "[Timer]\nOnCalendar=hourly\n"
    assert not (out / "safehold-home.service").exists()  # nothing half-written
    with pytest.raises(ScheduleInstallError, match="not deleting"):
        remove(["home"], dir=out)
    assert mine.exists()
    cron = out / "safehold"
    cron.write_text("0 0 * * * root /bin/true\n")
    with pytest.raises(ScheduleInstallError, match="not overwriting"):
        install(JOBS[:1], exe=SAFEHOLD, config_path=None, dir=out, cron=True)
    with pytest.raises(ScheduleInstallError, match="not changing"):
        remove(None, dir=out, cron=True)
    assert cron.read_text() == "0 0 * * * root /bin/true\n"


@pytest.mark.parametrize("user", [False, True])
def test_install_and_remove_cron_dir(tmp_path: Path, user: bool) -> None:
    out = tmp_path / "cron"
    path = out / "safehold"
    install(JOBS[:1], exe=SAFEHOLD, config_path=None, dir=out, cron=True, user=user)
    install(JOBS[1:2], exe=SAFEHOLD, config_path=None, dir=out, cron=True, user=user)
    assert installed_jobs(cron=True, dir=out) == ["db.dump-2", "home"]
    text = path.read_text()
    assert text.count(MARKER) == 1
    assert (text.splitlines()[0] == CRON_BEGIN) == user
    # reinstalling a job replaces its line
    install([ScheduledJob("home", parse_schedule("hourly"))], exe=SAFEHOLD, config_path=None,
            dir=out, cron=True, user=user)  # fmt: skip
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith(" run home")]
    assert len(lines) == 1 and lines[0].startswith("0 * * * * ")
    changes = remove(["home"], dir=out, cron=True, user=user)
    assert changes.written == [path]
    assert installed_jobs(cron=True, dir=out) == ["db.dump-2"]
    assert remove(["nope"], dir=out, cron=True, user=user).notes == [f"job nope: not in {path}"]
    changes = remove(["db.dump-2"], dir=out, cron=True, user=user)
    assert changes.removed == [path] and not path.exists()


# --- install / remove with systemctl ---------------------------------------------------------


def test_install_without_dir_runs_systemctl_and_says_when_it_fails(tmp_path: Path) -> None:
    """Without --dir the units go to the unit directory and systemctl reloads and enables
    them. Here systemd is not running (or systemctl is missing): a clear error that says the
    files were written. Never run where a real systemd could pick the units up."""
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd is running here: the test would enable real timers")
    units = tmp_path / "etc-systemd-system"
    with pytest.raises(ScheduleInstallError) as info:
        install(JOBS[:1], exe=SAFEHOLD, config_path=None, unit_dir=units)
    msg = str(info.value)
    assert "systemctl" in msg and f"the unit files were written to {units}" in msg
    assert "\n" not in msg
    assert sorted(p.name for p in units.iterdir()) == [
        "safehold-home.service",
        "safehold-home.timer",
    ]
    # remove disables first; when that fails nothing is deleted
    with pytest.raises(ScheduleInstallError, match="systemctl"):
        remove(["home"], unit_dir=units)
    assert len(list(units.iterdir())) == 2
