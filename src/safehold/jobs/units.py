"""systemd units and cron files that run safehold's jobs on their schedules.

``install`` writes, per job, ``safehold-JOB.service`` (a oneshot ``safehold [--config PATH] run
JOB`` at low CPU and I/O priority) and ``safehold-JOB.timer`` (the schedule as ``OnCalendar=``
lines, ``Persistent=true`` so a run missed while the machine was off happens at boot), or a cron
file. Every file it writes carries the line ``# written by safehold schedule install``; ``remove``
deletes only such files and refuses to touch any other. Where the files go:

* systemd, system-wide: ``/etc/systemd/system``, then ``systemctl daemon-reload`` and
  ``systemctl enable --now safehold-JOB.timer`` (``remove``: ``disable --now``, delete,
  ``daemon-reload``);
* systemd, ``user``: ``$XDG_CONFIG_HOME/systemd/user`` (``~/.config/systemd/user``), with
  ``systemctl --user``;
* cron, system-wide: ``/etc/cron.d/safehold`` (one file for every job, run as root);
* cron, ``user``: a block between ``# BEGIN safehold`` and ``# END safehold`` in the user's crontab
  (read with ``crontab -l``, written with ``crontab -``); the rest of the crontab is kept;
* with ``dir``: the files go straight into that directory (``safehold-JOB.service`` and
  ``.timer``, or ``safehold`` for cron, the crontab block for ``user``) and no ``systemctl`` or
  ``crontab`` runs, so it works without a running systemd.

Jobs lock themselves (``safehold run`` skips a job that is already running), so the commands need
no ``flock``. cron has no random delay of its own: a job's ``random_delay`` becomes a ``sleep`` of
a random length (``shuf``) before the run. Nothing here prints: the functions return what they did.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safehold.errors import SafeholdError, UsageError
from safehold.jobs.schedule import Schedule

MARKER = "# written by safehold schedule install"
CRON_BEGIN = "# BEGIN safehold"
CRON_END = "# END safehold"
CRON_FILE_NAME = "safehold"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CRON_DIR = Path("/etc/cron.d")

_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_SAFE_ARG_RE = re.compile(r"^[A-Za-z0-9_./:+@=,-]+$")


class ScheduleInstallError(SafeholdError):
    """``systemctl`` or ``crontab`` failed, or a file in the way was not written by safehold."""


def check_job_name(name: str) -> str:
    """A job name usable in unit file names and command lines: letters, digits, ``_``, ``.``
    and ``-``, not starting with ``.`` or ``-``, at most 100 characters."""
    if not _JOB_NAME_RE.match(name):
        raise UsageError(
            f"job name {name!r} is not allowed: use letters, digits, '_', '.' and '-' "
            "(not first), at most 100 characters"
        )
    return name


@dataclass(frozen=True)
class ScheduledJob:
    """What the units need to know about a job."""

    name: str
    schedule: Schedule
    random_delay_s: float = 0.0


@dataclass
class Changes:
    """What ``install``/``remove`` did: files written and removed, commands run, and notes for
    the user (e.g. a job that had nothing installed)."""

    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def unit_names(job: str) -> tuple[str, str]:
    """The service and timer file names of a job."""
    check_job_name(job)
    return f"safehold-{job}.service", f"safehold-{job}.timer"


# --- rendering ---------------------------------------------------------------------------------


def _argv(exe: str | Sequence[str], config_path: str | None, job: str) -> list[str]:
    head = [exe] if isinstance(exe, str) else list(exe)
    if not head or not os.path.isabs(head[0]):
        raise UsageError(f"the safehold executable must be an absolute path, not {head[:1]}")
    args = [*head]
    if config_path is not None:
        args += ["--config", os.path.abspath(config_path)]
    args += ["run", check_job_name(job)]
    for a in args:
        if any(ord(c) < 32 or ord(c) == 127 for c in a):
            raise UsageError(f"{a!r} contains a control character and cannot go in a unit file")
    return args


def _systemd_quote(arg: str, *, executable: bool = False) -> str:
    """One argument of a systemd command line: ``%`` (specifiers) and, except in the executable
    name, ``$`` (variables) are doubled; anything but plain characters goes in double quotes
    with C escapes. systemd refuses executable names with quotes or backslashes."""
    if executable and any(c in arg for c in "'\\\""):
        raise UsageError(
            f"systemd cannot run an executable whose path contains quotes or backslashes: "
            f"{arg!r} (give another path with --exe)"
        )
    text = arg.replace("%", "%%")
    if not executable:
        text = text.replace("$", "$$")
    if _SAFE_ARG_RE.match(arg):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_text(value: str) -> str:
    """A free-text setting value (Description=): specifiers escaped."""
    return value.replace("%", "%%")


def render_systemd(
    job: str,
    schedule: Schedule,
    *,
    exe: str | Sequence[str],
    config_path: str | None,
    random_delay_s: float,
    user: bool,
) -> tuple[str, str]:
    """The text of ``safehold-JOB.service`` and ``safehold-JOB.timer``."""
    service_name, _ = unit_names(job)
    argv = _argv(exe, config_path, job)
    exec_start = " ".join(_systemd_quote(a, executable=i == 0) for i, a in enumerate(argv))
    network = (
        ""
        if user
        else "Wants=network-online.target\nAfter=network-online.target\n"  # not in user managers
    )
    service = (
        f"{MARKER}\n"
        "[Unit]\n"
        f"Description=safehold backup job {job}\n"
        f"{network}"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={exec_start}\n"
        "Nice=10\n"
        "IOSchedulingClass=idle\n"
        f"SyslogIdentifier=safehold-{job}\n"
    )
    calendar = "".join(f"OnCalendar={expr}\n" for expr in schedule.oncalendar())
    delay = ""
    if random_delay_s > 0:
        delay = f"RandomizedDelaySec={max(1, round(random_delay_s))}\n"
    timer = (
        f"{MARKER}\n"
        "[Unit]\n"
        f"Description={_systemd_text(f'safehold backup job {job}: {schedule.describe()}')}\n"
        "\n"
        "[Timer]\n"
        f"{calendar}"
        "Persistent=true\n"
        f"{delay}"
        f"Unit={service_name}\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return service, timer


def _cron_quote(arg: str) -> str:
    # cron turns an unescaped % into a newline
    return shlex.quote(arg).replace("%", "\\%")


def _cron_block(
    job: str,
    schedule: Schedule,
    *,
    exe: str | Sequence[str],
    config_path: str | None,
    user: bool,
    random_delay_s: float = 0.0,
    run_as: str = "root",
) -> list[str]:
    command = " ".join(_cron_quote(a) for a in _argv(exe, config_path, job))
    steps = []
    guard = schedule.cron_guard()
    if guard:
        steps.append(guard)
    if random_delay_s >= 1:
        steps.append(f'sleep "$(shuf -i 0-{round(random_delay_s)} -n 1)"')
    steps.append(command)
    who = "" if user else f"{run_as} "
    return [f"# job {job}: {schedule.describe()}", f"{schedule.cron()} {who}{' && '.join(steps)}"]


def _cron_text(blocks: Mapping[str, list[str]], *, user: bool) -> str:
    lines: list[str] = []
    if user:
        lines += [CRON_BEGIN, MARKER]
    else:
        lines += [
            MARKER,
            "# safehold's jobs: edit the jobs file, then run 'safehold schedule install --cron'",
            "SHELL=/bin/sh",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
    for name in sorted(blocks):
        lines += blocks[name]
    if user:
        lines.append(CRON_END)
    return "\n".join(lines) + "\n"


def render_cron(
    jobs: Sequence[tuple[str, Schedule]],
    *,
    exe: str | Sequence[str],
    config_path: str | None,
    user: bool,
    random_delays: Mapping[str, float] | None = None,
    run_as: str = "root",
) -> str:
    """A cron.d file (with a user field, ``run_as``) or, for ``user``, a crontab block between
    ``# BEGIN safehold`` and ``# END safehold``. ``monthly last`` runs on days 28-31 behind a
    test that tomorrow is the 1st."""
    delays = random_delays or {}
    blocks = {
        name: _cron_block(
            name,
            sched,
            exe=exe,
            config_path=config_path,
            user=user,
            random_delay_s=delays.get(name, 0.0),
            run_as=run_as,
        )
        for name, sched in jobs
    }
    return _cron_text(blocks, user=user)


def _parse_cron_blocks(text: str) -> dict[str, list[str]]:
    """The per-job blocks of a cron text written by :func:`render_cron`."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"^# job ([A-Za-z0-9_.-]+): ", line)
        if m:
            current = blocks.setdefault(m.group(1), [])
            current.append(line)
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
            current = None
        else:
            current = None
    return blocks


def split_crontab(text: str) -> tuple[str, str | None]:
    """A crontab without safehold's block, and the block (or None)."""
    lines = text.splitlines(keepends=True)
    try:
        begin = next(i for i, line in enumerate(lines) if line.rstrip("\n") == CRON_BEGIN)
    except StopIteration:
        return text, None
    end = next(
        (i for i in range(begin, len(lines)) if lines[i].rstrip("\n") == CRON_END),
        len(lines) - 1,
    )
    return "".join(lines[:begin] + lines[end + 1 :]), "".join(lines[begin : end + 1])


def merge_crontab(existing: str, block: str | None) -> str:
    """The crontab ``existing`` with safehold's block replaced by ``block`` (removed if None)."""
    rest, _ = split_crontab(existing)
    if block is None:
        return rest
    if rest and not rest.endswith("\n"):
        rest += "\n"
    return rest + block


# --- files -------------------------------------------------------------------------------------


def default_unit_dir(user: bool) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return any(line.rstrip("\n") == MARKER for line in f)
    except FileNotFoundError:
        return False


def _refuse_foreign(paths: Sequence[Path], verb: str) -> None:
    for p in paths:
        if (p.exists() or p.is_symlink()) and not _ours(p):
            raise ScheduleInstallError(
                f"{p} was not written by safehold (it has no {MARKER!r} line): not {verb} it"
            )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _run(cmd: list[str], changes: Changes, *, stdin: str | None = None) -> str:
    changes.commands.append(cmd)
    try:
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ScheduleInstallError(
            f"{cmd[0]} not found (use --dir DIR to only write the files)"
        ) from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise ScheduleInstallError(f"'{shlex.join(cmd)}' failed: {why}")
    return res.stdout


def _systemctl(user: bool) -> list[str]:
    return ["systemctl", "--user"] if user else ["systemctl"]


def install(
    jobs: Sequence[ScheduledJob],
    *,
    exe: str | Sequence[str],
    config_path: str | None,
    cron: bool = False,
    user: bool = False,
    dir: Path | None = None,
    unit_dir: Path | None = None,
) -> Changes:
    """Write (and, without ``dir``, enable) the units or cron entries of ``jobs``.

    ``unit_dir`` overrides where systemd units go when ``dir`` is not given (still followed
    by ``systemctl``). Files in the way that safehold did not write are never overwritten."""
    for j in jobs:
        check_job_name(j.name)
    if cron:
        return _install_cron(jobs, exe=exe, config_path=config_path, user=user, dir=dir)
    changes = Changes()
    target = dir if dir is not None else (unit_dir or default_unit_dir(user))
    rendered: list[tuple[Path, str]] = []
    for j in jobs:
        service, timer = render_systemd(
            j.name,
            j.schedule,
            exe=exe,
            config_path=config_path,
            random_delay_s=j.random_delay_s,
            user=user,
        )
        sname, tname = unit_names(j.name)
        rendered += [(target / sname, service), (target / tname, timer)]
    _refuse_foreign([p for p, _ in rendered], "overwriting")
    for path, text in rendered:
        _write(path, text)
        changes.written.append(path)
    if dir is None and jobs:
        try:
            _run([*_systemctl(user), "daemon-reload"], changes)
            _run([*_systemctl(user), "enable", "--now", *[unit_names(j.name)[1] for j in jobs]],
                 changes)  # fmt: skip
        except ScheduleInstallError as e:
            raise ScheduleInstallError(
                f"{e} (the unit files were written to {target}; use --dir DIR to only write files)"
            ) from None
    return changes


def installed_jobs(*, cron: bool = False, user: bool = False, dir: Path | None = None,
                   unit_dir: Path | None = None) -> list[str]:  # fmt: skip
    """The jobs whose systemd units safehold wrote in the unit directory (or ``dir``), or
    whose entries are in safehold's cron file (``dir``/the system file; not the crontab)."""
    if cron:
        path = (dir if dir is not None else SYSTEM_CRON_DIR) / CRON_FILE_NAME
        if not _ours(path):
            return []
        return sorted(_parse_cron_blocks(path.read_text(encoding="utf-8")))
    target = dir if dir is not None else (unit_dir or default_unit_dir(user))
    names = set()
    if target.is_dir():
        for p in target.iterdir():
            m = re.match(r"^safehold-([A-Za-z0-9_.-]+)\.(service|timer)$", p.name)
            if m and _JOB_NAME_RE.match(m.group(1)) and _ours(p):
                names.add(m.group(1))
    return sorted(names)


def remove(
    names: Sequence[str] | None,
    *,
    cron: bool = False,
    user: bool = False,
    dir: Path | None = None,
    unit_dir: Path | None = None,
) -> Changes:
    """Remove the units (or cron entries) of the jobs ``names`` (None: of every job safehold
    installed). Only files with safehold's marker line are deleted; without ``dir`` the timers
    are first disabled and stopped."""
    for n in names or ():
        check_job_name(n)
    if cron:
        return _remove_cron(names, user=user, dir=dir)
    changes = Changes()
    target = dir if dir is not None else (unit_dir or default_unit_dir(user))
    if names is None:
        names = installed_jobs(dir=target)
    found: list[str] = []
    paths: list[Path] = []
    for n in names:
        job_paths = [target / u for u in unit_names(n)]
        present = [p for p in job_paths if p.exists() or p.is_symlink()]
        if not present:
            changes.notes.append(f"job {n}: no units in {target}")
            continue
        found.append(n)
        paths += present
    _refuse_foreign(paths, "deleting")
    if dir is None and found:
        _run([*_systemctl(user), "disable", "--now", *[unit_names(n)[1] for n in found]], changes)
    for p in paths:
        p.unlink()
        changes.removed.append(p)
    if dir is None and found:
        _run([*_systemctl(user), "daemon-reload"], changes)
    return changes


def _cron_path(dir: Path | None) -> Path:
    return (dir if dir is not None else SYSTEM_CRON_DIR) / CRON_FILE_NAME


def _read_crontab(changes: Changes) -> str:
    cmd = ["crontab", "-l"]
    changes.commands.append(cmd)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ScheduleInstallError(
            "crontab not found (install cron, or use --dir DIR to only write the block)"
        ) from None
    if res.returncode != 0:
        if "no crontab" in res.stderr.lower():
            return ""
        why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise ScheduleInstallError(f"'crontab -l' failed: {why}")
    return res.stdout


def _install_cron(
    jobs: Sequence[ScheduledJob],
    *,
    exe: str | Sequence[str],
    config_path: str | None,
    user: bool,
    dir: Path | None,
) -> Changes:
    changes = Changes()
    new = {
        j.name: _cron_block(
            j.name,
            j.schedule,
            exe=exe,
            config_path=config_path,
            user=user,
            random_delay_s=j.random_delay_s,
        )
        for j in jobs
    }
    if user and dir is None:
        existing = _read_crontab(changes)
        _, block = split_crontab(existing)
        blocks = _parse_cron_blocks(block or "")
        blocks.update(new)
        _run(
            ["crontab", "-"], changes, stdin=merge_crontab(existing, _cron_text(blocks, user=True))
        )
        return changes
    path = _cron_path(dir)
    _refuse_foreign([path], "overwriting")
    blocks = _parse_cron_blocks(path.read_text(encoding="utf-8")) if path.exists() else {}
    blocks.update(new)
    _write(path, _cron_text(blocks, user=user))
    changes.written.append(path)
    return changes


def _remove_cron(names: Sequence[str] | None, *, user: bool, dir: Path | None) -> Changes:
    changes = Changes()
    if user and dir is None:
        existing = _read_crontab(changes)
        _, block = split_crontab(existing)
        if block is None:
            changes.notes.append("the crontab has no safehold entries")
            return changes
        blocks = _parse_cron_blocks(block)
        for n in names or list(blocks):
            if blocks.pop(n, None) is None:
                changes.notes.append(f"job {n}: not in the crontab")
        new_block = _cron_text(blocks, user=True) if blocks else None
        _run(["crontab", "-"], changes, stdin=merge_crontab(existing, new_block))
        return changes
    path = _cron_path(dir)
    if not (path.exists() or path.is_symlink()):
        changes.notes.append(f"{path} does not exist")
        return changes
    _refuse_foreign([path], "changing")
    blocks = _parse_cron_blocks(path.read_text(encoding="utf-8"))
    for n in names or list(blocks):
        if blocks.pop(n, None) is None:
            changes.notes.append(f"job {n}: not in {path}")
    if blocks:
        _write(path, _cron_text(blocks, user=user))
        changes.written.append(path)
    else:
        path.unlink()
        changes.removed.append(path)
    return changes
