"""The jobs file: TOML with ``[repositories.NAME]`` and ``[jobs.NAME]`` tables.

:func:`load_config` reads and validates the whole file and raises :class:`ConfigError` listing
every problem (field path, line, offending value), not only the first; :func:`check_config`
returns the problems (errors and warnings) without raising, for ``safehold config check``.
Validation covers syntax, types, schedules and the references between names; whether a source
folder exists or a repository answers is decided when a job runs.

The names are a contract (docs, tests and users' files rely on them). The backup, retention,
prune and check options of a job use the option names of :mod:`safehold.ops.options`, the same
as on the command line (``exclude_larger_than`` is ``--exclude-larger-than``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from safehold.errors import UsageError
from safehold.jobs.schedule import Schedule, parse_delay, parse_schedule
from safehold.ops import options as oo
from safehold.ops.access import PasswordSource, RepoSpec

SYSTEM_CONFIG = Path("/etc/safehold/safehold.toml")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NOTIFY_ON = ("failure", "warning", "success")
DEFAULT_RETRY_LOCK_S = 600.0
"""How long a job waits for another client's exclusive lock (a prune) before failing."""


def default_config_path() -> Path:
    """``$SAFEHOLD_CONFIG_DIR/safehold.toml`` (or the user's config directory), then
    ``/etc/safehold/safehold.toml``."""
    base = os.environ.get("SAFEHOLD_CONFIG_DIR") or platformdirs.user_config_dir("safehold")
    user = Path(base) / "safehold.toml"
    if user.exists() or not SYSTEM_CONFIG.exists():
        return user
    return SYSTEM_CONFIG


@dataclass
class Problem:
    path: str  # dotted field path: jobs.photos.schedule
    line: int | None
    message: str
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        if self.path:
            return f"{self.path}{where}: {self.message}"
        return f"line {self.line}: {self.message}" if self.line else self.message


class ConfigError(UsageError):
    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        first = str(errors[0]) if errors else "invalid"
        more = f" (and {len(errors) - 1} more problems: run 'safehold config check')"
        super().__init__(f"{path}: {first}" + (more if len(errors) > 1 else ""))


@dataclass
class RepositoryConfig:
    name: str
    url: str
    password: PasswordSource
    options: dict[str, str] = field(default_factory=dict)
    retry_lock_s: float = DEFAULT_RETRY_LOCK_S

    def spec(self, cache_dir: Path | None = None) -> RepoSpec:
        return RepoSpec(self.url, self.password, dict(self.options), cache_dir, self.retry_lock_s)


@dataclass
class Cadence:
    """How often a maintenance step runs (``prune = "weekly"``): at most once per ``every_s``."""

    text: str
    every_s: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hooks:
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    on_failure: list[str] = field(default_factory=list)


@dataclass
class JobConfig:
    name: str
    repository: str
    sources: list[str] = field(default_factory=list)
    command: str | None = None  # its standard output is backed up as stdin_filename
    stdin_filename: str | None = None
    backup: dict[str, Any] = field(default_factory=dict)  # backup option name -> value
    schedule: Schedule | None = None
    random_delay_s: float = 0.0
    retention: dict[str, Any] | None = None  # forget option name -> value
    prune: Cadence | None = None
    check: Cadence | None = None
    hooks: Hooks = field(default_factory=Hooks)
    copy_to: list[str] = field(default_factory=list)
    mirror_to: list[str] = field(default_factory=list)
    notify: list[str] = field(default_factory=list)
    notify_on: tuple[str, ...] = ("failure", "warning")
    alert_if_no_success_s: float | None = None
    healthcheck: str | None = None
    timeout_s: float | None = None
    line: int | None = None


@dataclass
class Config:
    path: Path
    repositories: dict[str, RepositoryConfig] = field(default_factory=dict)
    jobs: dict[str, JobConfig] = field(default_factory=dict)
    state_dir: Path | None = None
    metrics_file: Path | None = None
    problems: list[Problem] = field(default_factory=list)  # the warnings of a valid file


# -- intervals -------------------------------------------------------------------------------

_INTERVAL_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_NAMED = {"hourly": 3600.0, "daily": 86400.0, "weekly": 7 * 86400.0, "monthly": 30 * 86400.0}
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_interval(text: str) -> float:
    """``"36h"``, ``"7d"``, ``"1w"``, ``"90m"``, ``"1d12h"`` or hourly/daily/weekly/monthly (30
    days) as seconds; ``always`` is 0 (every run)."""
    s = text.strip().lower()
    if s in _NAMED:
        return _NAMED[s]
    if s in ("always", "every run"):
        return 0.0
    parts = _INTERVAL_RE.findall(s)
    if not parts or re.sub(r"\s+", "", "".join(n + u for n, u in parts)) != s.replace(" ", ""):
        raise UsageError(
            f"{json.dumps(text)} is not an interval (e.g. 36h, 7d, 1w, daily, weekly, always)"
        )
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _looks_like_url(text: str) -> bool:
    """A backend URL or an absolute path, not a bare name (a typo of a repository's name)."""
    return "://" in text or text.startswith(("rclone:", "/", "~"))


# -- line numbers ----------------------------------------------------------------------------

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = re.compile(rf"^\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
_HEADER = re.compile(rf"^\s*\[\[?\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_KEY})\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(_KEY, text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def locate_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line of each table header and key (dotted path -> 1-based line), found by a light
    scan: good enough to point at the line of a problem."""
    where: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_quote = ""  # the delimiter of a multi-line string being read
    for n, line in enumerate(text.splitlines(), 1):
        if open_quote:
            if line.count(open_quote) % 2 == 1:
                open_quote = ""
            continue
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                open_quote = quote
        h = _HEADER.match(line)
        if h:
            table = _split_key(h.group(1))
            where.setdefault(table, n)
            continue
        k = _DOTTED.match(line)
        if k:
            path = table + _split_key(k.group(1))
            where.setdefault(path, n)
            rest = line[k.end() :]
            for inner in _INLINE_KEY.finditer(rest):
                where.setdefault(path + _split_key(inner.group(1)), n)
    return where


# -- validation ------------------------------------------------------------------------------


def _q(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


class _Checker:
    def __init__(self, lines: dict[tuple[str, ...], int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, path: tuple[str, ...], message: str, severity: str = "error") -> None:
        self.problems.append(Problem(".".join(path), self.line(path), message, severity))

    def warn(self, path: tuple[str, ...], message: str) -> None:
        self.error(path, message, "warning")

    def unknown(self, path: tuple[str, ...], key: str, known: list[str]) -> None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        self.error((*path, key), f"unknown field {_q(key)}{hint}")

    def string(self, path: tuple[str, ...], value: Any) -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        self.error(path, f"{_q(value)} is not a non-empty string")
        return None

    def strings(self, path: tuple[str, ...], value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(i, str) and i for i in items):
            return list(items)
        self.error(path, f"{_q(value)} is not a list of strings")
        return []

    def table(self, path: tuple[str, ...], value: Any) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"{_q(value)} is not a table")
        return None

    def interval(
        self, path: tuple[str, ...], value: Any, *, positive: bool = False
    ) -> float | None:
        if not isinstance(value, str):
            self.error(path, f"{_q(value)} is not an interval (e.g. 36h, 7d, weekly)")
            return None
        try:
            seconds = parse_interval(value)
        except UsageError as e:
            self.error(path, str(e))
            return None
        if positive and seconds <= 0:
            self.error(path, f"{_q(value)} must be longer than zero")
            return None
        return seconds

    def abspath(self, path: tuple[str, ...], value: Any) -> str | None:
        """A file name: ``~`` expanded; it must then be absolute (a relative one would depend
        on the directory the job is started from: / under systemd)."""
        s = self.string(path, value)
        if s is None:
            return None
        full = os.path.expanduser(s)
        if not os.path.isabs(full):
            self.error(path, f"{_q(s)} is not an absolute path")
            return None
        return full

    def options(
        self, path: tuple[str, ...], given: Mapping[str, Any], table: tuple[oo.Opt, ...]
    ) -> dict[str, Any]:
        known = oo.by_name(table)
        out: dict[str, Any] = {}
        for key, value in given.items():
            opt = known.get(key)
            if opt is None:
                self.unknown(path, key, list(known))
                continue
            try:
                oo.convert(opt, value)
            except UsageError as e:
                self.error((*path, key), f"{_q(value)}: {e}")
                continue
            out[key] = value
        return out


_REPO_KEYS = ["url", "password_file", "password_command", "password_env", "options", "retry_lock"]
_JOB_KEYS = [
    "repository",
    "sources",
    "command",
    "stdin_filename",
    "schedule",
    "random_delay",
    "retention",
    "prune",
    "check",
    "hooks",
    "copy_to",
    "mirror_to",
    "notify",
    "notify_on",
    "alert_if_no_success",
    "healthcheck",
    "timeout",
    "description",
]
_TOP_KEYS = ["repositories", "jobs", "settings"]
_SETTINGS_KEYS = ["state_dir", "metrics_file"]


def _repository(c: _Checker, name: str, raw: Any) -> RepositoryConfig | None:
    path = ("repositories", name)
    if not NAME_RE.match(name):
        c.error(path, f"{_q(name)} is not a valid name (letters, digits, _ . -)")
    t = c.table(path, raw)
    if t is None:
        return None
    for key in t:
        if key not in _REPO_KEYS:
            c.unknown(path, key, _REPO_KEYS)
    url = c.string((*path, "url"), t.get("url")) if "url" in t else None
    if "url" not in t:
        c.error(path, "no url")
    sources = [k for k in ("password_file", "password_command", "password_env") if k in t]
    if len(sources) > 1:
        c.error((*path, sources[1]), f"give one password source, not {' and '.join(sources)}")
    if not sources:
        c.error(path, "no password source: set password_file, password_command or password_env")
    pw = PasswordSource()
    for key in sources[:1]:
        if key == "password_file":
            value = c.abspath((*path, key), t[key])
        else:
            value = c.string((*path, key), t[key])
        if value is not None:
            setattr(pw, key.removeprefix("password_"), value)
    options: dict[str, str] = {}
    if "options" in t:
        o = c.table((*path, "options"), t["options"])
        for k, v in (o or {}).items():
            if isinstance(v, (str, int, float, bool)) and not isinstance(v, bool):
                options[k] = str(v)
            elif isinstance(v, bool):
                options[k] = "true" if v else "false"
            else:
                c.error((*path, "options", k), f"{_q(v)} is not a string")
    retry = DEFAULT_RETRY_LOCK_S
    if "retry_lock" in t:
        retry = c.interval((*path, "retry_lock"), t["retry_lock"]) or 0.0
    if url is None:
        return None
    return RepositoryConfig(name, url, pw, options, retry)


def _cadence(
    c: _Checker, path: tuple[str, ...], raw: Any, table: tuple[oo.Opt, ...]
) -> Cadence | None:
    if isinstance(raw, str):
        every = c.interval(path, raw)
        return None if every is None else Cadence(raw, every)
    t = c.table(path, raw)
    if t is None:
        return None
    rest = {k: v for k, v in t.items() if k != "every"}
    if "every" not in t:
        c.error(path, 'no "every" (e.g. every = "weekly")')
        every = None
    else:
        every = c.interval((*path, "every"), t["every"])
    opts = c.options(path, rest, table)
    return None if every is None else Cadence(str(t["every"]), every, opts)


def _job(c: _Checker, name: str, raw: Any, repos: Mapping[str, Any]) -> JobConfig | None:
    path = ("jobs", name)
    if not NAME_RE.match(name):
        c.error(path, f"{_q(name)} is not a valid job name (letters, digits, _ . -)")
    t = c.table(path, raw)
    if t is None:
        return None
    backup_names = [o.name for o in oo.BACKUP_OPTS]
    backup_raw = {k: v for k, v in t.items() if k in backup_names}
    for key in t:
        if key not in _JOB_KEYS and key not in backup_names:
            c.unknown(path, key, _JOB_KEYS + backup_names)
    job = JobConfig(name=name, repository="", line=c.line(path))
    if "repository" not in t:
        c.error(path, "no repository")
    else:
        repo = c.string((*path, "repository"), t["repository"])
        if repo is not None and repo not in repos:
            close = difflib.get_close_matches(repo, list(repos), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            c.error((*path, "repository"), f"{_q(repo)} is not a repository of this file{hint}")
        job.repository = repo or ""
    if "sources" in t and "command" in t:
        c.error((*path, "command"), "give sources or a command, not both")
    if "sources" in t:
        job.sources = c.strings((*path, "sources"), t["sources"])
        for i, s in enumerate(job.sources):
            if not os.path.isabs(os.path.expanduser(s)):
                c.error((*path, "sources"), f"{_q(s)} is not an absolute path (item {i + 1})")
        if t["sources"] == []:
            c.error((*path, "sources"), "the list is empty")
    elif "command" in t:
        job.command = c.string((*path, "command"), t["command"])
    else:
        c.error(path, "nothing to back up: give sources (paths) or a command")
    if "stdin_filename" in t:
        fname = c.string((*path, "stdin_filename"), t["stdin_filename"])
        if fname is not None and "/" in fname:
            c.error((*path, "stdin_filename"), f"{_q(fname)} must be a plain file name")
        if "command" not in t:
            c.warn((*path, "stdin_filename"), "only used with a command")
        job.stdin_filename = fname
    elif job.command:
        job.stdin_filename = f"{name}.out"
    job.backup = c.options(path, backup_raw, oo.BACKUP_OPTS)
    if "exclude_file" in job.backup:
        files = (
            [job.backup["exclude_file"]]
            if isinstance(job.backup["exclude_file"], str)
            else job.backup["exclude_file"]
        )
        expanded = [c.abspath((*path, "exclude_file"), f) for f in files]
        job.backup["exclude_file"] = [f for f in expanded if f is not None]
    if "schedule" in t:
        value = t["schedule"]
        if not isinstance(value, str):
            c.error((*path, "schedule"), f"{_q(value)} is not a schedule")
        else:
            try:
                job.schedule = parse_schedule(value)
            except UsageError as e:
                c.error((*path, "schedule"), str(e))
    if "random_delay" in t:
        value = t["random_delay"]
        try:
            if not isinstance(value, str):
                raise UsageError(f"{_q(value)} is not a delay (e.g. 30m)")
            job.random_delay_s = parse_delay(value)
        except UsageError as e:
            c.error((*path, "random_delay"), str(e))
        if "schedule" not in t:
            c.warn((*path, "random_delay"), "only used with a schedule")
    if "retention" in t:
        r = c.table((*path, "retention"), t["retention"])
        if r is not None:
            before = len(c.problems)
            job.retention = c.options((*path, "retention"), r, oo.RETENTION_OPTS)
            try:
                policy, _ = oo.retention_policy(job.retention)
                if policy.empty() and len(c.problems) == before:
                    c.error((*path, "retention"), "keeps nothing: give keep_last, keep_daily, ...")
            except UsageError as e:
                c.error((*path, "retention"), str(e))
    if "prune" in t:
        job.prune = _cadence(c, (*path, "prune"), t["prune"], oo.PRUNE_OPTS)
        if "retention" not in t:
            c.warn((*path, "prune"), "without retention, prune only frees what forget removed")
    elif "retention" in t:
        c.warn(
            (*path, "retention"),
            'no prune cadence: forgotten snapshots\' data is never freed (add prune = "weekly")',
        )
    if "check" in t:
        job.check = _cadence(c, (*path, "check"), t["check"], oo.CHECK_OPTS)
        if job.check is not None and {"read_data", "read_data_subset"} <= set(job.check.options):
            c.error((*path, "check"), "give read_data or read_data_subset, not both")
    if "hooks" in t:
        h = c.table((*path, "hooks"), t["hooks"])
        for key, value in (h or {}).items():
            if key not in ("before", "after", "on_failure"):
                c.unknown((*path, "hooks"), key, ["before", "after", "on_failure"])
                continue
            setattr(job.hooks, key, c.strings((*path, "hooks", key), value))
    for key in ("copy_to", "mirror_to"):
        if key in t:
            setattr(job, key, c.strings((*path, key), t[key]))
    for target in job.mirror_to:
        if target in repos:
            if target == job.repository:
                c.error((*path, "mirror_to"), f"{_q(target)} is the job's own repository")
        elif not _looks_like_url(target):
            close = difflib.get_close_matches(target, list(repos), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            c.error(
                (*path, "mirror_to"),
                f"{_q(target)} is neither a repository of this file nor a URL "
                f"(rclone:REMOTE:PATH, s3://..., sftp://..., /absolute/path){hint}",
            )
    for target in job.copy_to:
        if target not in repos:
            close = difflib.get_close_matches(target, list(repos), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            c.error((*path, "copy_to"), f"{_q(target)} is not a repository of this file{hint}")
        elif target == job.repository:
            c.error((*path, "copy_to"), f"{_q(target)} is the job's own repository")
    if "notify" in t:
        from safehold.jobs.notify import validate_target

        job.notify = c.strings((*path, "notify"), t["notify"])
        for target in job.notify:
            why = validate_target(target)
            if why:
                c.error((*path, "notify"), why)
    if "notify_on" in t:
        on = c.strings((*path, "notify_on"), t["notify_on"])
        for item in on:
            if item not in NOTIFY_ON:
                c.error((*path, "notify_on"), f"{_q(item)} is not one of {', '.join(NOTIFY_ON)}")
        job.notify_on = tuple(i for i in on if i in NOTIFY_ON)
    if "alert_if_no_success" in t:
        job.alert_if_no_success_s = c.interval(
            (*path, "alert_if_no_success"), t["alert_if_no_success"], positive=True
        )
        if not job.notify:
            c.warn((*path, "alert_if_no_success"), "no notify targets to alert")
    if "healthcheck" in t:
        url = c.string((*path, "healthcheck"), t["healthcheck"])
        m = re.match(r"^https?://([^/?#]*)", url or "")
        if url is not None and (m is None or not m.group(1)):
            c.error((*path, "healthcheck"), f"{_q(url)} is not an http(s) URL")
        elif url is not None and m is not None and "@" in m.group(1):
            c.error(
                (*path, "healthcheck"),
                "a user or password in the URL is not sent: put the token in the path",
            )
        job.healthcheck = url
    if "timeout" in t:
        job.timeout_s = c.interval((*path, "timeout"), t["timeout"], positive=True)
    if "description" in t:
        c.string((*path, "description"), t["description"])
    return job


def check_text(text: str, path: Path) -> tuple[Config, list[Problem]]:
    """Parse and validate; the config holds what is valid, the problems say what is not."""
    cfg = Config(path=path)
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)", str(e))
        if m:
            line: int | None = int(m.group(1))
            why = f"{str(e)[: m.start()]} (column {m.group(2)})"
        else:
            line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
            why = str(e).replace(" (at end of document)", " at the end of the file")
        return cfg, [Problem("", line, f"not valid TOML: {why}")]
    c = _Checker(locate_lines(text))
    for key in data:
        if key not in _TOP_KEYS:
            c.unknown((), key, _TOP_KEYS)
    repos = c.table(("repositories",), data.get("repositories", {})) or {}
    for name, raw in repos.items():
        r = _repository(c, name, raw)
        if r is not None:
            cfg.repositories[name] = r
    jobs = c.table(("jobs",), data.get("jobs", {})) or {}
    if not jobs:
        c.warn(("jobs",), "no jobs")
    for name, raw in jobs.items():
        j = _job(c, name, raw, repos)
        if j is not None:
            cfg.jobs[name] = j
    settings = c.table(("settings",), data.get("settings", {})) or {}
    for key, value in settings.items():
        if key not in _SETTINGS_KEYS:
            c.unknown(("settings",), key, _SETTINGS_KEYS)
            continue
        s = c.abspath(("settings", key), value)
        if s is not None:
            setattr(cfg, key, Path(s))
    c.problems.sort(key=lambda p: p.line or 0)  # stable: in file order, then as found
    cfg.problems = [p for p in c.problems if p.severity != "error"]
    return cfg, c.problems


def check_config(path: Path | str | None = None) -> tuple[Config, list[Problem]]:
    path = Path(path) if path is not None else default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no jobs file at {path} (give --config PATH)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the jobs file {path}: {e}") from None
    return check_text(text, path)


def load_config(path: Path | str | None = None) -> Config:
    """The jobs file, validated: raises ConfigError naming the problems when it has errors."""
    cfg, problems = check_config(path)
    if any(p.severity == "error" for p in problems):
        raise ConfigError(cfg.path, problems)
    return cfg
