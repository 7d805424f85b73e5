"""Alerts and monitoring for unattended jobs: messages to apprise URLs (email, webhooks and every
service apprise supports) and to shell commands, healthchecks.io-style pings, the dead man's
switch decision and a Prometheus textfile.

Nothing here prints and nothing here raises for a delivery that did not work: :func:`send`
returns one line per target that could not be delivered and reports everything else through
the ``log`` callback it is given. Secrets never appear in what it sends or logs: target URLs are
shown through :func:`redact`, and the secrets a message names (``extra["secrets"]``, e.g. the
repository passwords) are replaced with ``***`` by :func:`scrub` before anything is sent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import apprise

from safehold.ops.shell import run_shell

Log = Callable[[str], None]


def _no_log(_text: str) -> None:
    pass


# -- messages ---------------------------------------------------------------------------------

RESULTS = ("failed", "warning", "ok", "no-success")
"""What a :class:`Message` can report: a failed run, a run with warnings, a successful run, and
the dead man's switch (the job has not succeeded for too long)."""

_TITLE_WORDS = {
    "failed": "FAILED",
    "warning": "had WARNINGS",
    "ok": "OK",
    "no-success": "has NOT SUCCEEDED recently",
}
_RESULT_WORDS = {
    "failed": "FAILED",
    "warning": "finished with warnings",
    "ok": "ok",
    "no-success": "no recent success (dead man's switch)",
}

MAX_TAIL_LINES = 100
"""At most this many log lines go into a message (the last ones)."""
MAX_LINE_CHARS = 1000
"""Longer log lines are cut to this many characters in a message."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _format_duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    whole = round(s)
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


@dataclass
class Message:
    """What an alert says. ``result`` is one of :data:`RESULTS`; ``summary`` is one line saying
    what failed; ``log_tail`` the last lines of the run's log. ``extra`` may carry
    ``"secrets"`` (strings that :func:`send` replaces with ``***`` in everything it sends) and
    other scalar details, shown as ``key: value`` lines in the body."""

    job: str
    host: str
    result: str
    summary: str
    log_tail: list[str] = field(default_factory=list)
    log_path: str | None = None
    started: datetime | None = None
    duration_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"unknown result {self.result!r} (one of {', '.join(RESULTS)})")

    def title(self) -> str:
        """One line: ``safehold: job home FAILED on laptop``."""
        word = _TITLE_WORDS[self.result]
        return f"safehold: job {_one_line(self.job)} {word} on {_one_line(self.host)}"

    def body(self) -> str:
        """Plain text: job, host, result, what failed, when, how long, the log file and the last
        lines of the log."""
        lines = [
            f"Job:      {_one_line(self.job)}",
            f"Host:     {_one_line(self.host)}",
            f"Result:   {_RESULT_WORDS[self.result]}",
            f"What:     {_one_line(self.summary) or '-'}",
        ]
        if self.started is not None:
            lines.append(f"Started:  {self.started.isoformat(sep=' ', timespec='seconds')}")
        if self.duration_s is not None:
            lines.append(f"Duration: {_format_duration(self.duration_s)}")
        if self.log_path:
            lines.append(f"Log:      {_one_line(self.log_path)}")
        for key, value in self.extra.items():
            if key == "secrets" or key.startswith("_"):
                continue
            if isinstance(value, str | int | float | bool):
                lines.append(f"{_one_line(str(key))}: {_one_line(str(value))}")
        tail = self.log_tail[-MAX_TAIL_LINES:]
        if tail:
            lines.append("")
            lines.append(f"Last {len(tail)} lines of the log:")
            for line in tail:
                line = line.rstrip("\r\n")
                if len(line) > MAX_LINE_CHARS:
                    line = line[:MAX_LINE_CHARS] + " [...]"
                lines.append(f"  {line}")
        return "\n".join(lines) + "\n"

    def secrets(self) -> list[str]:
        """The strings ``extra["secrets"]`` names (none if it is absent)."""
        raw = self.extra.get("secrets") or []
        if isinstance(raw, str):
            return [raw]
        return [s for s in raw if isinstance(s, str)]


# -- redaction --------------------------------------------------------------------------------

_SECRET_PARAM = re.compile(
    r"pass|pwd|token|secret|key|auth|sig|credential|session|cookie", re.IGNORECASE
)
_TOKENISH = re.compile(r"^[A-Za-z0-9_\-:]{16,}$")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.DOTALL)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
MASK = "***"


def _is_tokenish(part: str) -> bool:
    """A path segment or host that looks like an access token (webhook ids, bot tokens, ping
    UUIDs): 16 or more letters, digits, ``-``, ``_`` or ``:``, with both letters and digits."""
    return (
        bool(_TOKENISH.match(part))
        and any(c.isdigit() for c in part)
        and any(c.isalpha() for c in part)
    )


def _redact_host(host: str) -> str:
    if _is_tokenish(host):
        return MASK
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and _is_tokenish(name):
        return f"{MASK}:{port}"
    return host


def _redact_query(query: str) -> str:
    out = []
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        plain = urllib.parse.unquote_plus(name).lstrip(":+-")
        if sep and value and _SECRET_PARAM.search(plain):
            out.append(f"{name}={MASK}")
        else:
            out.append(item)
    return "&".join(out)


def redact(url: str) -> str:
    """``url`` fit to show: the password of its user info, query parameters named like a secret
    (``pass``, ``password``, ``token``, ``key``, ``apikey``, ``secret``, ``auth``, ...) and path
    segments or hosts that look like access tokens (webhook tokens, bot tokens, ping UUIDs)
    become ``***``: ``mailtos://user:pw@host`` → ``mailtos://user:***@host``. A ``command:``
    target keeps its command with the URLs in it redacted; other text is returned as it is."""
    if url.startswith("command:"):
        return "command:" + _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), url[len("command:") :])
    m = _URL.match(url)
    if not m:
        return url
    scheme, rest = m.group("scheme"), m.group("rest")
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon:
            userinfo = f"{user}:{MASK}" if password else f"{user}:"
        elif _is_tokenish(user):
            userinfo = MASK
    host = _redact_host(host)
    path = "/".join(MASK if _is_tokenish(p) else p for p in path.split("/"))
    query = _redact_query(query) if qmark else ""
    fragment = MASK if hash_ and fragment else fragment
    return f"{scheme}://{userinfo}{at}{host}{slash}{path}{qmark}{query}{hash_}{fragment}"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each non-empty secret (and its URL-quoted forms)
    replaced with ``***``; longer secrets are replaced first, so one that contains another is
    hidden whole."""
    forms: set[str] = set()
    for s in secrets:
        if not s:
            continue
        forms.add(s)
        forms.add(urllib.parse.quote(s, safe=""))
        forms.add(urllib.parse.quote_plus(s, safe=""))
    for s in sorted(forms, key=len, reverse=True):
        if s:
            text = text.replace(s, MASK)
    return text


def _url_secrets(url: str) -> list[str]:
    """The secrets inside a target URL (its password, secret query values, token-like parts),
    to scrub from anything apprise says about it."""
    if url.startswith("command:"):
        return []
    m = _URL.match(url)
    if not m:
        return []
    found: list[str] = []
    rest = m.group("rest").partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if password:
            found += [password, urllib.parse.unquote(password)]
        elif not colon and _is_tokenish(user):
            found.append(user)
    found += [p for p in [*path.split("/"), host, host.rpartition(":")[0]] if _is_tokenish(p)]
    for item in query.split("&"):
        name, sep, value = item.partition("=")
        if sep and value and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
            found += [value, urllib.parse.unquote_plus(value)]
    # a very short one would garble every word it occurs in; redact() already hides it
    return [s for s in found if len(s) >= 4]


# -- apprise ----------------------------------------------------------------------------------

_NOTIFY_TYPE = {
    "failed": apprise.NotifyType.FAILURE,
    "no-success": apprise.NotifyType.FAILURE,
    "warning": apprise.NotifyType.WARNING,
    "ok": apprise.NotifyType.SUCCESS,
}


def _quiet_apprise() -> None:
    """Keep apprise off stderr and out of the application's log handlers: its records reach us
    only through the per-call ``log_callback`` of :func:`send`."""
    logger = logging.getLogger(apprise.LOGGER_NAME)
    logger.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_apprise() -> Iterator[_Capture]:
    _quiet_apprise()
    logger = logging.getLogger(apprise.LOGGER_NAME)
    handler = _Capture()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _asset(timeout_s: float) -> apprise.AppriseAsset:
    # No plugin paths (nothing loaded from ~/.apprise), no persistent storage on disk, no
    # ${NAME} templates filled from the environment; apprise never reads a configuration file
    # unless it is given one (only its own CLI looks for them).
    return apprise.AppriseAsset(
        storage_mode="memory",
        allow_templates=False,
        async_mode=False,  # in the calling thread: no pool of apprise's own to wait for at exit
        service_timeout=timeout_s + 5.0,
    )


def _instantiate(url: str, timeout_s: float) -> tuple[Any | None, list[str]]:
    """The apprise plugin for ``url`` (None if apprise cannot use it) and what apprise said."""
    with _capture_apprise() as cap:
        try:
            plugin = apprise.Apprise.instantiate(url, asset=_asset(timeout_s))
        except Exception as e:  # apprise reports bad URLs by logging, but be sure
            cap.messages.append(f"{type(e).__name__}: {e}")
            plugin = None
    return plugin, cap.messages


def validate_target(url: str) -> str | None:
    """Why ``url`` cannot be used as a ``notify`` target, or None if it can: an apprise URL
    that apprise cannot parse, or a ``command:`` with no command."""
    target = url.strip()
    if not target:
        return "an empty notify target"
    if target.startswith("command:"):
        if not target[len("command:") :].strip():
            return "command: target without a command"
        return None
    plugin, said = _instantiate(target, 30.0)
    if plugin is not None:
        return None
    return f"{redact(target)!r} is not a usable notify target: {_reason(target, said)}"


def _reason(url: str, said: list[str]) -> str:
    """Why apprise refused ``url``, from what it logged: its specific complaints, without the
    ones that quote the URL (apprise's masking shows the first and last letters of a
    password)."""
    m = _URL.match(url)
    if not m:
        return "expected an apprise URL (e.g. mailtos://..., json://...) or command:SHELL COMMAND"
    specific = [_one_line(s) for s in said if "://" not in s and s.strip()]
    if specific:
        return scrub("; ".join(dict.fromkeys(specific)), _url_secrets(url))
    if any(s.startswith("Unparseable URL") for s in said):
        return f"apprise has no service {m.group('scheme')}://"
    return "apprise cannot parse it"


def _send_apprise(
    url: str, title: str, body: str, notify_type: apprise.NotifyType, timeout_s: float, log: Log
) -> str | None:
    """Deliver through apprise; None on success, otherwise why not."""
    plugin, said = _instantiate(url, timeout_s)
    if plugin is None:
        return f"not a usable apprise URL: {_reason(url, said)}"
    # bound every socket operation by the timeout (apprise's own defaults go up to 15s for a
    # connect), so a dead server costs at most timeout_s and leaves no thread behind
    for attr in ("socket_connect_timeout", "socket_read_timeout"):
        current = getattr(plugin, attr, None)
        if isinstance(current, int | float):
            setattr(plugin, attr, min(float(current), timeout_s))
    said = []

    def record(entry: Any, _service: Any) -> None:
        said.append(str(getattr(entry, "message", entry)))

    ap = apprise.Apprise(asset=plugin.asset)
    if not ap.add(plugin):
        return "not a usable apprise URL"
    _quiet_apprise()
    try:
        result = ap.notify(
            body=body,
            title=title,
            notify_type=notify_type,
            body_format=apprise.NotifyFormat.TEXT,
            timeout=timeout_s + 5.0,
            log_callback=record,
            log_level=logging.WARNING,
        )
    except Exception as e:  # a plugin bug must not stop the other targets
        return f"{type(e).__name__}: {e}"
    for line in said:
        log(f"apprise: {line}")
    if bool(result):
        return None
    status = getattr(result, "status", None)
    if status == apprise.AppriseResultStatus.TIMEOUT:
        return f"timed out after {timeout_s:g}s"
    return said[-1] if said else "apprise reported a failure"


# -- command targets --------------------------------------------------------------------------


def _send_command(
    command: str, msg: Message, title: str, body: str, timeout_s: float, log: Log
) -> str | None:
    env = dict(os.environ)
    env.update(
        SAFEHOLD_JOB=msg.job,
        SAFEHOLD_RESULT=msg.result,
        SAFEHOLD_HOST=msg.host,
        SAFEHOLD_LOG=msg.log_path or "",
        SAFEHOLD_TITLE=title,
    )
    try:
        r = run_shell(command, env=env, input=body.encode("utf-8"), timeout_s=timeout_s)
    except OSError as e:
        return f"cannot run /bin/sh: {e.strerror or e}"
    if r.timed_out:
        return f"timed out after {timeout_s:g}s"
    text = r.out.decode("utf-8", "replace").strip().splitlines()
    for line in text[-5:]:
        log(f"command: {line}")
    if r.code != 0:
        return r.status().removeprefix("was ") + (f": {text[-1]}" if text else "")
    return None


# -- send -------------------------------------------------------------------------------------


def send(
    targets: Sequence[str],
    msg: Message,
    *,
    log: Log = _no_log,
    timeout_s: float = 30,
) -> list[str]:
    """Deliver ``msg`` to every target, one after the other, each within ``timeout_s``.

    A target is an apprise URL (``mailtos://user:pw@smtp.example.com?to=...``,
    ``json://host:port/path``, ...) or ``command:SHELL COMMAND`` (run by ``/bin/sh -c`` with
    the body on standard input and ``SAFEHOLD_JOB``, ``SAFEHOLD_RESULT``, ``SAFEHOLD_HOST``,
    ``SAFEHOLD_LOG`` and ``SAFEHOLD_TITLE`` in its environment; a non-zero status or a timeout
    is a failure). Returns one line per target that could not be delivered, naming it through
    :func:`redact`; never raises for a delivery failure, and a failed target does not stop the
    others. The secrets in ``msg.extra["secrets"]`` are replaced with ``***`` in the title, the
    body, the failure lines and the log."""
    secrets = msg.secrets()
    title = scrub(msg.title(), secrets)
    body = scrub(msg.body(), secrets)
    notify_type = _NOTIFY_TYPE[msg.result]
    failures: list[str] = []
    for raw in targets:
        target = raw.strip()
        shown = scrub(redact(target), secrets)
        hide = [*secrets, *_url_secrets(target)]

        def say(text: str, hide: list[str] = hide) -> None:
            log(scrub(text, hide))

        if not target:
            why: str | None = "empty target"
        elif target.startswith("command:"):
            command = target[len("command:") :].strip()
            if not command:
                why = "no command given"
            else:
                why = _send_command(command, msg, title, body, timeout_s, say)
        else:
            why = _bounded(
                functools.partial(_send_apprise, target, title, body, notify_type, timeout_s, say),
                timeout_s + 10.0,
            )
        if why is None:
            say(f"alert sent to {shown}")
            continue
        line = f"{shown}: {scrub(_one_line(why), hide)}"
        say(f"alert not delivered: {line}")
        failures.append(line)
    return failures


# -- health-check pings -----------------------------------------------------------------------

PING_KINDS = {"start": "/start", "success": "", "fail": "/fail"}
MAX_PING_BODY = 10 * 1024


def ping(
    url: str,
    kind: str,
    *,
    body: str = "",
    log: Log = _no_log,
    timeout_s: float = 10,
) -> bool:
    """A healthchecks.io-style ping: POST ``body`` (the log tail; its last 10 KiB) to
    ``url + "/start"``, ``url`` or ``url + "/fail"`` for ``kind`` ``"start"``, ``"success"``
    or ``"fail"``. True if the server answered 2xx; a failure is logged, never raised."""
    if kind not in PING_KINDS:
        raise ValueError(f"unknown ping kind {kind!r} (one of {', '.join(PING_KINDS)})")
    base = url.strip()
    target = base.rstrip("/") + PING_KINDS[kind] if PING_KINDS[kind] else base
    data = body.encode("utf-8", "replace")
    if len(data) > MAX_PING_BODY:
        data = data[-MAX_PING_BODY:]
        # do not start inside a UTF-8 sequence
        while data and (data[0] & 0xC0) == 0x80:
            data = data[1:]
    shown = redact(target)
    hide = _url_secrets(target)
    why = _bounded(lambda: _post(target, data, kind, shown, hide, timeout_s, log), timeout_s + 5.0)
    if why is not None:  # the server trickles its answer: given up
        log(scrub(f"health-check ping {kind} to {shown} failed: {why}", hide))
        return False
    return True


def _post(
    target: str, data: bytes, kind: str, shown: str, hide: list[str], timeout_s: float, log: Log
) -> str | None:
    """The POST of :func:`ping`; None when it succeeded or was logged as failed."""
    try:
        request = urllib.request.Request(
            target,
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": "safehold"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
            response.read(1024)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", None) or e)
    if not 200 <= status < 300:
        return f"HTTP {status}"
    return None


def _bounded(fn: Callable[[], str | None], limit_s: float) -> str | None:
    """``fn()`` in a daemon thread, given up after ``limit_s`` (a server that answers one byte
    at a time defeats every socket timeout): its result, or why it was given up. A thread given
    up on never keeps the process alive."""
    out: list[str | None] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # a plugin's bug
            out.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=run, name="safehold-notify", daemon=True)
    t.start()
    t.join(limit_s)
    if t.is_alive() or not out:
        return f"no answer within {limit_s:g}s: given up"
    return out[0]


# -- the dead man's switch --------------------------------------------------------------------


def overdue(
    now: datetime,
    first_seen: datetime,
    last_success: datetime | None,
    limit_s: float,
    last_alert: datetime | None,
) -> bool:
    """Whether to alert now that a job has not succeeded for too long.

    The silence starts at ``last_success`` (or at ``first_seen``, the job's first appearance in
    the history, when it never succeeded) and becomes alert-worthy at its deadline, ``limit_s``
    seconds later. Before the deadline: no alert. After it: alert if no alert was sent during
    this silence (``last_alert`` is None or before the deadline, i.e. it belonged to an earlier
    silence); once alerted, alert again only when another ``limit_s`` has passed since that
    alert, so a job that stays broken re-alerts at most once per ``limit_s``. All datetimes
    must be alike (all timezone-aware, or all naive in the same zone)."""
    start = last_success if last_success is not None else first_seen
    deadline = start + timedelta(seconds=limit_s)
    if now < deadline:
        return False
    if last_alert is None or last_alert < deadline:
        return True
    return now >= last_alert + timedelta(seconds=limit_s)


# -- Prometheus textfile ----------------------------------------------------------------------


@dataclass
class JobMetrics:
    """One job's numbers for the textfile; None leaves the sample out."""

    job: str
    last_success_ts: float | None
    last_run_ts: float | None
    last_result: str | None
    duration_s: float | None
    bytes_added: int | None
    repository_bytes: int | None
    files_new: int | None


METRIC_RESULTS = ("ok", "warning", "failed")
"""The states ``safehold_job_last_result`` always lists (1 for the current one, 0 otherwise);
any other recorded result (e.g. ``skipped``) is listed too when it is the current one."""


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


_GAUGES: list[tuple[str, str, str]] = [
    ("safehold_job_last_success_timestamp_seconds", "last_success_ts",
     "Time of the job's last successful run (seconds since the epoch)."),
    ("safehold_job_last_run_timestamp_seconds", "last_run_ts",
     "Start time of the job's last run (seconds since the epoch)."),
    ("safehold_job_duration_seconds", "duration_s", "Duration of the job's last run."),
    ("safehold_job_bytes_added", "bytes_added",
     "Bytes the job's last run added to the repository (after deduplication and compression)."),
    ("safehold_repository_bytes", "repository_bytes",
     "Size of the job's repository after its last run."),
    ("safehold_job_files_new", "files_new", "New files in the job's last snapshot."),
]  # fmt: skip


def render_metrics(rows: Sequence[JobMetrics]) -> str:
    """The textfile :func:`write_metrics` writes (Prometheus text exposition format 0.0.4)."""
    out: list[str] = []

    def family(name: str, help_text: str) -> None:
        out.append(f"# HELP {name} {_escape_help(help_text)}")
        out.append(f"# TYPE {name} gauge")

    for name, attr, help_text in _GAUGES[:2]:
        family(name, help_text)
        for row in rows:
            value = getattr(row, attr)
            if value is not None:
                out.append(f'{name}{{job="{_escape_label(row.job)}"}} {_number(value)}')
    name = "safehold_job_last_result"
    family(name, "Result of the job's last run: 1 for the current result, 0 for the others.")
    for row in rows:
        if row.last_result is None:
            continue
        states = list(METRIC_RESULTS)
        if row.last_result not in states:
            states.append(row.last_result)
        for state in states:
            labels = f'job="{_escape_label(row.job)}",result="{_escape_label(state)}"'
            out.append(f"{name}{{{labels}}} {1 if state == row.last_result else 0}")
    for name, attr, help_text in _GAUGES[2:]:
        family(name, help_text)
        for row in rows:
            value = getattr(row, attr)
            if value is not None:
                out.append(f'{name}{{job="{_escape_label(row.job)}"}} {_number(value)}')
    return "\n".join(out) + "\n"


def write_metrics(path: Path, rows: Sequence[JobMetrics]) -> None:
    """Write the Prometheus textfile for ``rows`` to ``path`` atomically: a temporary file in
    the same directory (not named ``*.prom``, so the node_exporter textfile collector ignores
    it), made readable by all, synced, then renamed over ``path``. Raises OSError if it cannot
    be written (nothing half-written is left behind)."""
    path = Path(path)
    text = render_metrics(rows).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
