"""A repository on any rclone remote: ``rclone:REMOTE:PATH``, driving the real rclone binary.

Everything after ``rclone:`` is handed to rclone as it is, so every form rclone knows works: a
configured remote (``rclone:mybox:backups/laptop``), an on-the-fly one
(``rclone::sftp,host=nas:backups``) or a plain path (``rclone:/mnt/backups``). The rclone
configuration is rclone's own: ``RCLONE_CONFIG`` and every other ``RCLONE_*`` variable pass
through (``-o rclone.config=PATH`` names the config file, ``-o rclone.binary=PATH`` the binary).

How, and why this way. Each backend starts one ``rclone rcd`` (rclone's remote-control daemon)
on 127.0.0.1, on a port the kernel picks (``--rc-addr 127.0.0.1:0``; rclone logs the port it
got, so there is no race for a "free" port), with a random user and password (given through the
environment, not the command line, where other users could read them), and talks to it with the
standard library's ``http.client`` over kept-alive connections: JSON calls
(``operations/list``, ``stat``, ``uploadfile``, ``movefile``, ``deletefile``, ``mkdir``) and,
with ``--rc-serve``, plain HTTP GETs with a ``Range`` header for loads. One long-lived process
keeps rclone's connections to the remote (SSH sessions, HTTP pools, OAuth tokens) open across
operations; starting ``rclone`` once per operation would cost ~0.1 s and a fresh login to the
remote each time. The daemon is stopped by :meth:`RcloneBackend.close` and at interpreter exit;
on Linux it also gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``, set in the child before
it runs rclone; the processes are started from one long-lived thread, as that signal follows the
thread that started the child). It runs in its own session (a Ctrl-C meant for safehold does not
stop it before safehold has cleaned up) with umask 077. If it dies anyway, the next operation
fails transiently and the one after starts a new daemon.

Listings are one recursive ``operations/list`` of the folder part of the prefix, in rclone's
own statistics group: some remotes skip what they cannot read (the local one: an unreadable
folder) and only count an error there, which is checked, so a partial listing raises instead of
passing for a complete one.

Create-if-absent: rclone has no atomic "create if absent" on most remotes. A store stats the
name first; if an object is there it is compared (same content: success, so a retried store is
harmless; other content: :class:`~safehold.errors.AlreadyExists`). Otherwise the data is
uploaded to a temporary ``.tmp-<random>`` name beside the target (skipped by listings) and moved
into place, so readers see all of the object or nothing on remotes that rename (local, SFTP, …)
or copy atomically (object stores). Stores of one name by threads of this process are
serialised, so among them exactly one of different contents wins; between processes the check and
the move can race. That is safe because the names safehold creates without ``overwrite`` are
content-addressed (the same name always means the same bytes) or random; ``overwrite=True`` is
only for lock objects. rclone moves over an existing object by deleting it first, so on remotes
that rename, a lock being refreshed is briefly absent.

A store cut short (safehold or the daemon killed, the remote unreachable) can leave its
temporary behind (or, with rclone versions that upload to ``<name>.<hash>.partial`` first, that
file, whose name starts with ``.tmp-`` too). :meth:`RcloneBackend.clean_temporaries` lists
them with the modification times the remote reports and deletes those older than a given age.
"""

from __future__ import annotations

import atexit
import base64
import builtins
import collections
import concurrent.futures
import ctypes
import http.client
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from safehold.backends.base import Backend, ObjectInfo, check_older_than
from safehold.backends.local import TMP_PREFIX, byte_view, check_name, check_prefix, check_range
from safehold.errors import (
    AlreadyExists,
    BackendError,
    NotFound,
    PermanentError,
    TransientError,
    UsageError,
)

START_TIMEOUT = 30.0
"""Seconds to wait for ``rclone rcd`` to start serving."""
IO_TIMEOUT = 360.0
"""Seconds of silence on a connection to the daemon before giving up (rclone's own idle
timeout for transfers, ``--timeout``, is 5 minutes)."""

MISSING_BINARY = (
    "rclone not found: install it (e.g. apt-get install rclone) or set -o rclone.binary=PATH"
)

_SERVING = re.compile(r"Serving remote control on https?://[^\s/]*:(\d+)/")
_LOG_TIME = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? ")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(-?\d+)/(\d+|\*)$")
_LOCK_STRIPES = 64
_SEND_CHUNK = 1 << 20

# Settings of the user's environment that would break how we drive the daemon: its address and
# credentials are ours; the port is read from its log on stderr; a dry run would lose data.
_DROPPED_ENV_PREFIXES = ("RCLONE_RC_",)
_DROPPED_ENV = frozenset(
    {
        "RCLONE_LOG_FILE",
        "RCLONE_LOG_LEVEL",
        "RCLONE_LOG_FORMAT",
        "RCLONE_USE_JSON_LOG",
        "RCLONE_VERBOSE",
        "RCLONE_QUIET",
        "RCLONE_DRY_RUN",
        "RCLONE_INTERACTIVE",
        "RCLONE_SYSLOG",
    }
)

# Substrings of rclone's error texts (lowercased) that retrying will not fix.
_PERMANENT_HINTS = (
    "permission denied",
    "access denied",
    "accessdenied",
    "forbidden",
    "unauthorized",
    "unauthorised",
    "authentication",
    "invalid_grant",
    "no space left",
    "quota",
    "read-only file system",
    "file name too long",
    "not a directory",
)
# Substrings that say the remote could not be reached (still worth retrying).
_NETWORK_HINTS = (
    "dial tcp",
    "connection refused",
    "no such host",
    "i/o timeout",
    "timeout",
    "connection reset",
    "broken pipe",
    "network is unreachable",
    "no route to host",
    "tls handshake",
    "eof",
    "couldn't connect",
)
_NOT_CONFIGURED = "didn't find section in config file"
_IS_A_DIRECTORY = "is a directory"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --- starting and stopping daemons ---------------------------------------------------------------


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child killed when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


_spawn_queue: queue.SimpleQueue[
    tuple[Callable[[], subprocess.Popen[bytes]], concurrent.futures.Future[subprocess.Popen[bytes]]]
] = queue.SimpleQueue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        start, future = _spawn_queue.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(start())
        except BaseException as e:
            future.set_exception(e)


def _spawn(start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Run ``start`` (which starts a process) in the one long-lived spawner thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="rclone-spawner", daemon=True)
            _spawner.start()
    future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    _spawn_queue.put((start, future))
    return future.result()


_live_lock = threading.Lock()
_live: set[_Daemon] = set()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        daemons = list(_live)
    for daemon in daemons:
        daemon.stop()


def _child_env(base: Mapping[str, str], user: str, password: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in base.items()
        if key not in _DROPPED_ENV and not key.startswith(_DROPPED_ENV_PREFIXES)
    }
    env["RCLONE_RC_USER"] = user
    env["RCLONE_RC_PASS"] = password
    return env


class _Unreachable(Exception):
    """No answer from the daemon (a connection error or a timeout)."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class _Daemon:
    """One ``rclone rcd`` process and a pool of HTTP connections to it."""

    def __init__(self, binary: str, config: str | None) -> None:
        user = "safehold-" + secrets.token_hex(8)
        password = secrets.token_urlsafe(24)
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        argv = [binary, "rcd", "--rc-addr", "127.0.0.1:0", "--rc-serve", "--log-level", "NOTICE"]
        argv.append("--ask-password=false")  # an encrypted config needs RCLONE_CONFIG_PASS
        if config is not None:
            argv += ["--config", config]
        env = _child_env(os.environ, user, password)
        preexec = _pdeathsig_preexec()

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                umask=0o077,
                preexec_fn=preexec,
            )

        try:
            self.proc = _spawn(start)
        except FileNotFoundError:
            raise PermanentError(MISSING_BINARY) from None
        except PermissionError:
            raise PermanentError(f"cannot run rclone binary {binary}: permission denied") from None
        except (OSError, subprocess.SubprocessError) as e:
            raise PermanentError(f"cannot run rclone binary {binary}: {_one_line(e)}") from None
        self._tail: collections.deque[str] = collections.deque(maxlen=20)
        self._port: int | None = None
        self._ready = threading.Event()
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_lock = threading.Lock()
        with _live_lock:
            _live.add(self)
        threading.Thread(target=self._drain, name="rclone-stderr", daemon=True).start()
        try:
            self._wait_ready(binary)
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        """Read rclone's log (until it exits): find the port it serves on, keep the last lines
        for messages. Reading on also keeps rclone from blocking on a full pipe."""
        stream = self.proc.stderr
        assert stream is not None
        try:
            for raw in stream:
                line = _LOG_TIME.sub("", raw.decode("utf-8", "replace").rstrip())
                if self._port is None:
                    m = _SERVING.search(line)
                    if m:
                        self._port = int(m.group(1))
                        self._ready.set()
                        continue
                if line:
                    self._tail.append(line)
        except (OSError, ValueError):
            pass
        finally:
            self._ready.set()
            try:
                stream.close()
            except OSError:
                pass

    def _wait_ready(self, binary: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready.wait(0.05):
            if time.monotonic() > deadline:
                raise TransientError(
                    f"rclone rcd ({binary}) did not start serving within {START_TIMEOUT:.0f} s"
                )
        if self._port is None:
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            raise PermanentError(f"rclone rcd ({binary}) exited at start ({self.why(code)})")

    def why(self, code: int | None = None) -> str:
        """A short description of why the daemon stopped: its exit status and last log line."""
        if code is None:
            code = self.proc.poll()
        status = "still running" if code is None else f"status {code}"
        last = _one_line(self._tail[-1]) if self._tail else "no message"
        return f"{status}: {last}"

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        with _live_lock:
            _live.discard(self)
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- HTTP ----------------------------------------------------------------------------------

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop(), True
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=IO_TIMEOUT), False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._pool_lock:
            self._pool.append(conn)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Sequence[bytes | memoryview] = (),
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Send a request; the status, headers and whole body of the answer."""
        length = sum(len(part) for part in body)
        for attempt in range(2):
            conn, reused = self._take()
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                conn.putheader("Authorization", self._auth)
                for key, value in (headers or {}).items():
                    conn.putheader(key, value)
                if method != "GET" or length:
                    conn.putheader("Content-Length", str(length))
                conn.endheaders()
                for part in body:
                    view = memoryview(part)
                    for start in range(0, len(view), _SEND_CHUNK):
                        conn.send(view[start : start + _SEND_CHUNK])
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                stale = isinstance(
                    e, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError
                )
                if reused and stale and attempt == 0:
                    continue  # the daemon closed an idle kept-alive connection: a fresh one
                refused = isinstance(e, ConnectionRefusedError)
                raise _Unreachable(_one_line(e) or type(e).__name__, refused=refused) from e
            if resp.will_close:
                conn.close()
            else:
                self._give(conn)
            return resp.status, resp.msg, data
        raise AssertionError("unreachable")  # pragma: no cover


# --- the backend ---------------------------------------------------------------------------------


class RcloneBackend:
    """Objects on the rclone remote ``fs`` (``REMOTE:PATH``); see the module's description."""

    consistent_listing = False  # many remotes list with a lag (prune then waits a grace period)

    def __init__(self, fs: str, *, binary: str | None = None, config: str | None = None) -> None:
        if not fs or any(ord(c) < 0x20 or ord(c) == 0x7F for c in fs):
            raise ValueError(f"invalid rclone remote {fs!r}")
        if "]" in fs:
            raise ValueError(f"rclone remote {fs!r} must not contain ']'")
        if len(fs) > 1 and fs.endswith("/") and not fs.endswith(":/"):
            fs = fs.rstrip("/") or "/"
        self.fs = fs
        colon = fs.find(":")
        # "remote:path" names a configured remote; ":type,opts:path" an on-the-fly one; a
        # string without a colon before any slash is a local path.
        slash = fs.find("/")
        self.remote = fs[:colon] if colon > 0 and (slash < 0 or colon < slash) else ""
        self._binary = binary
        self._config = config or None
        self._daemon: _Daemon | None = None
        self._daemon_lock = threading.Lock()
        self._closed = False
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def __repr__(self) -> str:
        return f"RcloneBackend({self.fs!r})"

    @property
    def location(self) -> str:
        return f"rclone:{self.fs}"

    # --- the daemon ----------------------------------------------------------------------------

    def _binary_path(self) -> str:
        if self._binary:
            return self._binary
        found = shutil.which("rclone")
        if found is None:
            raise PermanentError(MISSING_BINARY)
        return found

    def _get_daemon(self) -> _Daemon:
        with self._daemon_lock:
            if self._closed:
                raise PermanentError(f"the rclone backend for {self.location} is closed")
            if self._daemon is None:
                self._daemon = _Daemon(self._binary_path(), self._config)
            return self._daemon

    def _request(
        self,
        op: str,
        name: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Sequence[bytes | memoryview] = (),
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        daemon = self._get_daemon()
        try:
            return daemon.request(method, path, headers=headers, body=body)
        except _Unreachable as e:
            # Has it exited, or is it exiting? (A killed daemon refuses or resets connections
            # for a moment before it can be reaped.)
            try:
                daemon.proc.wait(2 if e.refused else 0.5)
            except subprocess.TimeoutExpired:
                if not e.refused:
                    raise TransientError(
                        f"cannot {op} {self._where(name)}: no answer from rclone rcd: {e}"
                    ) from None
            # Gone, or nothing listens on its port: the next call starts a new one.
            why = daemon.why()
            with self._daemon_lock:
                if self._daemon is daemon:
                    self._daemon = None
            daemon.stop()
            raise TransientError(
                f"cannot {op} {self._where(name)}: rclone rcd stopped ({why})"
            ) from None

    def _rc(self, op: str, name: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Call the daemon's ``method`` with JSON ``params``; its JSON answer."""
        status, _, data = self._request(
            op,
            name,
            "POST",
            "/" + method,
            headers={"Content-Type": "application/json"},
            body=[json.dumps(params).encode()],
        )
        answer = _json(data)
        if status == 200 and isinstance(answer, dict):
            return answer
        raise self._error(status, data, op, name)

    # --- errors --------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        if not name:
            return self.location
        sep = "" if self.fs.endswith((":", "/")) else "/"
        return f"{self.location}{sep}{name}"

    def _error(self, status: int, data: bytes, op: str, name: str) -> BackendError:
        """The safehold error for an error answer of the daemon to ``op`` on ``name``."""
        answer = _json(data)
        message = ""
        if isinstance(answer, dict) and answer.get("error"):
            message = _one_line(answer["error"])
        if not message:
            message = _one_line(data.decode("utf-8", "replace"))[:300] or f"HTTP {status}"
        lower = message.lower()
        if _NOT_CONFIGURED in lower:
            return PermanentError(self._not_configured())
        if name and (status == 404 or _IS_A_DIRECTORY in lower) and op != "store":
            return NotFound(f"{name} not found in {self.location}")
        if _IS_A_DIRECTORY in lower:
            return PermanentError(f"cannot {op} {self._where(name)}: {message}")
        if status == 401:
            return PermanentError(f"rclone rcd refused the credentials safehold gave it ({op})")
        if status == 400 or any(hint in lower for hint in _PERMANENT_HINTS):
            return PermanentError(f"cannot {op} {self._where(name)}: {message}")
        if any(hint in lower for hint in _NETWORK_HINTS):
            label = repr(self.remote) if self.remote else self.fs
            target = f"{op} {name}" if name else op
            return TransientError(f"cannot reach rclone remote {label}: {target}: {message}")
        return TransientError(f"cannot {op} {self._where(name)}: {message}")

    def _not_configured(self) -> str:
        config = self._config or os.environ.get("RCLONE_CONFIG") or self._default_config()
        where = f" in {config}" if config else ""
        return (
            f"rclone remote {self.remote!r} is not configured{where} "
            f"(add it with 'rclone config', or set RCLONE_CONFIG or -o rclone.config=PATH)"
        )

    def _default_config(self) -> str:
        """The config file rclone uses by default, as ``rclone config file`` says ("" if not)."""
        try:
            proc = subprocess.run(
                [self._binary_path(), "config", "file"],
                capture_output=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError, BackendError):
            return ""
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if proc.returncode == 0 and lines else ""

    # --- helpers -------------------------------------------------------------------------------

    def _serve_path(self, name: str) -> str:
        """The daemon's URL path of object ``name`` (``--rc-serve``: ``/[fs]/name``)."""
        return "/" + quote(f"[{self.fs}]/{name}", safe="/:[],=@+")

    def _lock(self, name: str) -> threading.Lock:
        return self._stripes[zlib.crc32(name.encode()) % _LOCK_STRIPES]

    def _stat(self, name: str, op: str) -> int:
        """The size of object ``name``; NotFound if there is none (or it is a folder)."""
        answer = self._rc(
            op,
            name,
            "operations/stat",
            {"fs": self.fs, "remote": name, "opt": {"noModTime": True, "noMimeType": True}},
        )
        item = answer.get("item")
        if not isinstance(item, dict) or item.get("IsDir"):
            raise NotFound(f"{name} not found in {self.location}")
        return int(item.get("Size", -1))

    def _is_object(self, name: str) -> bool:
        try:
            self._stat(name, "list")
        except (NotFound, PermanentError, TransientError):
            return False
        return True

    def _get(self, name: str, op: str, offset: int, length: int | None) -> bytes:
        headers: dict[str, str] = {}
        ranged = offset > 0 or length is not None
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        status, resp_headers, data = self._request(
            op, name, "GET", self._serve_path(name), headers=headers
        )
        if status == 200:
            if not ranged:
                return data
            # The server ignored the Range header and sent the whole object: cut it here.
            return data[offset:] if length is None else data[offset : offset + length]
        if status == 416:
            return b""  # the offset is at or past the end: an empty range, as HTTP says
        if status != 206:
            raise self._error(status, data, op, name)
        content_range = resp_headers.get("Content-Range", "")
        m = _CONTENT_RANGE.match(content_range)
        if m is None:
            raise TransientError(f"unexpected Content-Range {content_range!r} for {name}")
        start, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and start >= int(total):
            return b""  # rclone answers "bytes 200-11/12" (and no body) past the end
        if start != offset:
            raise TransientError(f"unexpected Content-Range {content_range!r} for {name}")
        want = max(0, last - start + 1)
        if len(data) != want:
            raise TransientError(f"short read of {name}: got {len(data)} of {want} bytes")
        return data

    def _same_content(self, name: str, view: memoryview) -> bool | None:
        """Whether the stored object holds exactly ``view``; None if there is no object."""
        try:
            if self._stat(name, "store") != len(view):
                return False
            data = self._get(name, "store", 0, None)
        except NotFound:
            return None
        return len(data) == len(view) and view == data

    def _upload(self, name: str, view: memoryview) -> str:
        """Upload ``view`` to a new temporary name beside ``name``; returns that name."""
        folder, _, _ = name.rpartition("/")
        tmp_base = TMP_PREFIX + secrets.token_hex(8)
        tmp = f"{folder}/{tmp_base}" if folder else tmp_base
        boundary = "safehold-" + secrets.token_hex(16)
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{tmp_base}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        query = urlencode({"fs": self.fs, "remote": folder})
        status, _, data = self._request(
            "store",
            name,
            "POST",
            f"/operations/uploadfile?{query}",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            body=[head, view, tail],
        )
        if status != 200:
            self._discard(tmp)
            raise self._error(status, data, "store", name)
        return tmp

    def _discard(self, tmp: str) -> None:
        """Delete a temporary object, if it is there (best effort)."""
        try:
            self._rc("store", tmp, "operations/deletefile", {"fs": self.fs, "remote": tmp})
        except BackendError:
            pass

    # --- the Backend protocol ------------------------------------------------------------------

    def create(self) -> None:
        self._rc("create", "", "operations/mkdir", {"fs": self.fs, "remote": ""})

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        for entry in self._list_files(prefix[: prefix.rfind("/") + 1].rstrip("/"), "list"):
            name = str(entry.get("Path", ""))
            if not name.startswith(prefix):
                continue
            try:
                check_name(name)
            except ValueError:
                continue  # not an object of ours (temporary files and the like)
            yield ObjectInfo(name, int(entry.get("Size", 0)))

    def _list_files(
        self, folder: str, op: str, *, mod_times: bool = False
    ) -> builtins.list[dict[str, Any]]:
        """rclone's entries (``Path``, ``Size``, ``ModTime``, …) of every file under ``folder``
        ("" for all): one recursive ``operations/list``. Raises if the listing is incomplete."""
        # Some remotes skip what they cannot read (local: an unreadable folder) and only count
        # an error in the call's statistics: read them, so a partial listing is never taken
        # for a complete one.
        group = "safehold-list-" + secrets.token_hex(8)
        params = {
            "fs": self.fs,
            "remote": folder,
            "opt": {
                "recurse": True,
                "filesOnly": True,
                "noModTime": not mod_times,
                "noMimeType": True,
            },
            "_group": group,
        }
        try:
            status, _, data = self._request(
                op,
                "",
                "POST",
                "/operations/list",
                headers={"Content-Type": "application/json"},
                body=[json.dumps(params).encode()],
            )
            stats = self._rc(op, "", "core/stats", {"group": group})
        finally:
            try:
                self._rc(op, "", "core/stats-delete", {"group": group})
            except BackendError:
                pass
        if status == 404:
            return []  # no such folder: nothing in it
        answer = _json(data)
        if status != 200 or not isinstance(answer, dict):
            if folder and self._is_object(folder):
                return []  # "config/": the "folder" is an object, so nothing is in it
            raise self._error(status, data, op, "")
        if stats.get("errors"):
            error = _one_line(stats.get("lastError") or "an error")
            raise self._error(
                500, json.dumps({"error": f"incomplete listing: {error}"}).encode(), op, ""
            )
        entries = answer.get("list")
        if not isinstance(entries, list):
            raise TransientError(f"cannot {op} {self._where(folder)}: malformed answer")
        return [e for e in entries if isinstance(e, dict) and not e.get("IsDir")]

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        check_range(offset, length)
        if length == 0:
            self._stat(name, "load")  # NotFound if it is missing; the range is empty anyway
            return b""
        return self._get(name, "load", offset, length)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        check_name(name)
        view = byte_view(data)
        with self._lock(name):
            if not overwrite:
                same = self._same_content(name, view)
                if same is True:
                    return
                if same is False:
                    raise AlreadyExists(
                        f"{name} already exists in {self.location} with different content"
                    )
            tmp = self._upload(name, view)
            try:
                self._rc(
                    "store",
                    name,
                    "operations/movefile",
                    {"srcFs": self.fs, "srcRemote": tmp, "dstFs": self.fs, "dstRemote": name},
                )
            except BaseException:
                self._discard(tmp)
                raise

    def delete(self, name: str) -> None:
        check_name(name)
        self._rc("delete", name, "operations/deletefile", {"fs": self.fs, "remote": name})

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        return ObjectInfo(name, self._stat(name, "stat"))

    def close(self) -> None:
        with self._daemon_lock:
            self._closed = True
            daemon, self._daemon = self._daemon, None
        if daemon is not None:
            daemon.stop()

    # --- beyond the protocol -------------------------------------------------------------------

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """Remove the temporaries (``.tmp-…``) of interrupted stores whose modification time,
        as the remote reports it, is more than ``older_than_s`` seconds before now (this
        machine's clock); their names relative to the repository path.

        See :class:`~safehold.backends.base.CleansTemporaries`. A temporary whose time the
        remote does not give (or gives in a form not understood) is left alone.
        """
        cutoff = time.time() - check_older_than(older_than_s)
        removed: builtins.list[str] = []
        for entry in self._list_files("", "clean", mod_times=True):
            name = str(entry.get("Path", ""))
            if not name.rpartition("/")[2].startswith(TMP_PREFIX):
                continue
            mtime = _mod_time(entry.get("ModTime"))
            if mtime is None or mtime >= cutoff:
                continue  # young (its store may still be under way), or of unknown age
            try:
                self._rc("remove", name, "operations/deletefile", {"fs": self.fs, "remote": name})
            except NotFound:
                continue  # moved into place or removed meanwhile
            removed.append(name)
        return removed


def _mod_time(value: object) -> float | None:
    """A ``ModTime`` of rclone's listings (RFC 3339, e.g. ``2024-05-01T10:00:00.123456789Z``)
    as a POSIX timestamp; None if there is none or it has no time zone."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


# --- opening from a URL --------------------------------------------------------------------------


def open_rclone(url: str, options: Mapping[str, str]) -> Backend:
    """``rclone:REMOTE:PATH`` with the ``rclone.*`` options, behind a RetryingBackend."""
    from safehold.backends.wrappers import RetryingBackend

    scheme, sep, fs = url.partition(":")
    if scheme.lower() != "rclone" or not sep:
        raise UsageError(f"not an rclone URL: {url!r}")
    if fs.startswith("//"):
        raise UsageError(f"rclone URL {url!r}: write rclone:REMOTE:PATH (no '//')")
    if not fs:
        raise UsageError(f"rclone URL {url!r} names no remote; use rclone:REMOTE:PATH")
    try:
        backend = RcloneBackend(
            fs,
            binary=options.get("rclone.binary") or None,
            config=options.get("rclone.config") or None,
        )
    except ValueError as e:
        raise UsageError(f"{e} in {url!r}") from None
    return RetryingBackend(backend)
