"""A repository in a folder on an SSH server, spoken to over SFTP (any OpenSSH server will do).

``sftp://user@host[:port]/abs/path`` names an absolute path; ``sftp://user@host/~/path`` a path
relative to the login folder. Object ``name`` is the file ``<path>/<name>``; the ``/`` in names
maps to sub-folders, made on demand, as in :class:`~safehold.backends.local.LocalBackend`.

Authentication is by key only: the SSH agent, ``-o sftp.key-file=PATH``, the ``IdentityFile`` of
``~/.ssh/config`` and the default ``~/.ssh/id_*`` files. ``~/.ssh/config`` also gives
``HostName``, ``Port`` and ``User`` (a port or user in the URL wins). The server's host key must
be known: it is looked up in ``~/.ssh/known_hosts``, ``/etc/ssh/ssh_known_hosts`` and the file of
``-o sftp.known-hosts=PATH``; an unknown or changed key is refused, never accepted.

A store writes ``.tmp-<random>`` in the target folder (pipelined writes, ``fsync@openssh.com``
where the server has it), then renames it with a plain SSH_FXP_RENAME, which OpenSSH carries out
with ``link(2)`` and so refuses when the target exists: that is the create-if-absent. When the
rename is refused the stored object is compared with the new content (the same: success, so a
retried store is harmless; other content: AlreadyExists). ``overwrite=True`` uses
``posix-rename@openssh.com``, an atomic replace. (On a file system without hard links OpenSSH
falls back to check-then-rename, which two concurrent stores of one name can race; harmless for
content-addressed names, as with LocalBackend's same fallback.)

A store cut short (the client killed, the connection lost) leaves its ``.tmp-…`` file on the
server; :meth:`SFTPBackend.clean_temporaries` removes those whose modification time, as the
server reports it, is older than a given age.

One SSH connection carries up to ``max_sessions`` SFTP sessions (one per concurrent caller).
A connection that drops or stops answering is closed; the call that noticed raises
TransientError (so RetryingBackend tries again) and the next call connects anew.

The SFTP requests are sent through paramiko's request machinery (``_async_request`` and
``_read_response`` of :class:`paramiko.SFTPClient`, unchanged since paramiko 1.x) rather than
its file objects, whose pipelined writes drop the server's error answers.
"""

from __future__ import annotations

import base64
import builtins
import getpass
import hashlib
import logging
import os
import posixpath
import socket
import stat as stat_module
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import quote, unquote, urlsplit

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_REALPATH,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_STAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_DESC,
    SFTP_EOF,
    SFTP_FAILURE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_OP_UNSUPPORTED,
    SFTP_PERMISSION_DENIED,
    int64,
)

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

# paramiko logs connection trouble at ERROR level from its own threads; without a handler of
# its own, logging's last resort would print those lines to stderr beside safehold's one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

T = TypeVar("T")

DEFAULT_PORT = 22
DEFAULT_TIMEOUT = 30.0
MAX_SESSIONS = 8
"""SFTP sessions per connection (OpenSSH allows 10 by default: MaxSessions)."""

CHUNK = 32 << 10
"""Bytes per read or write request: the size every SFTP server accepts."""
WINDOW = 64
"""Read or write requests in flight at once (as OpenSSH's sftp client)."""
DIR_WINDOW = 16
"""Folders read at once while listing."""

_FILE_MODE = 0o600
_DIR_MODE = 0o700
_STORE_ROUNDS = 5
_KEEPALIVE = 15


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _reason(e: BaseException) -> str:
    """A short, one-line description of an exception."""
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        reasons = {
            (getattr(x, "strerror", None) or _one_line(x) or type(x).__name__)
            for x in e.errors.values()
        }
        return "; ".join(sorted(reasons)) or "connection failed"
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return _one_line(e.strerror)
    return _one_line(e) or type(e).__name__


def _fingerprint(key: paramiko.PKey) -> str:
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode("ascii")
    return f"{key.get_name()} SHA256:{digest.rstrip('=')}"


# --- the SFTP requests ---------------------------------------------------------------------------


class _Status(Exception):
    """The server answered a request with an error status."""

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text or (SFTP_DESC[code] if 0 <= code < len(SFTP_DESC) else f"status {code}")
        super().__init__(self.text)


class _ProtocolError(Exception):
    """The server answered with something the protocol does not allow there."""


@dataclass(eq=False)
class _Conn:
    """One SSH connection and its idle SFTP sessions."""

    client: paramiko.SSHClient
    transport: paramiko.Transport
    limit: int
    idle: list[_Session] = field(default_factory=list)
    busy: int = 0

    def active(self) -> bool:
        return self.transport.is_active()


class _Session:
    """One SFTP session (an SSH channel), used by one thread at a time.

    Requests are sent with paramiko's ``_async_request`` naming this object as the receiver of
    the answer; ``_read_response`` reads one answer and hands it to :meth:`_async_response`.
    Any exception other than :class:`_Status` means the session is broken.
    """

    def __init__(self, conn: _Conn, sftp: paramiko.SFTPClient) -> None:
        self.conn = conn
        self.sftp = sftp
        self._raw: Any = sftp
        self._answers: dict[int, tuple[int, paramiko.Message]] = {}

    # paramiko calls this (from _read_response, in the waiting thread) with each answer.
    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self._answers[num] = (t, msg)

    def send(self, t: int, *args: object) -> int:
        return int(self._raw._async_request(self, t, *args))

    def wait(self, num: int) -> tuple[int, paramiko.Message]:
        while num not in self._answers:
            self._raw._read_response()
        return self._answers.pop(num)

    def wait_some(self, nums: Mapping[int, object]) -> list[tuple[int, int, paramiko.Message]]:
        """At least one answer to the requests ``nums``: ``(num, type, message)`` each."""
        while True:
            ready = [n for n in self._answers if n in nums]
            if ready:
                return [(n, *self._answers.pop(n)) for n in ready]
            self._raw._read_response()

    def call(self, t: int, *args: object) -> tuple[int, paramiko.Message]:
        return self.wait(self.send(t, *args))

    @staticmethod
    def check(t: int, msg: paramiko.Message) -> None:
        """Raise :class:`_Status` for an error status answer."""
        if t != CMD_STATUS:
            raise _ProtocolError(f"expected a status answer, got message type {t}")
        _raise_status(msg)

    def status(self, t: int, *args: object) -> None:
        self.check(*self.call(t, *args))

    def handle(self, t: int, *args: object) -> bytes:
        kind, msg = self.call(t, *args)
        if kind == CMD_STATUS:
            _raise_status(msg)
        if kind != CMD_HANDLE:
            raise _ProtocolError(f"expected a handle, got message type {kind}")
        return bytes(msg.get_binary())

    def attrs(self, t: int, *args: object) -> paramiko.SFTPAttributes:
        kind, msg = self.call(t, *args)
        if kind == CMD_STATUS:
            _raise_status(msg)
        if kind != CMD_ATTRS:
            raise _ProtocolError(f"expected attributes, got message type {kind}")
        return _attrs(msg)

    def realpath(self, path: str) -> str:
        kind, msg = self.call(CMD_REALPATH, path)
        if kind == CMD_STATUS:
            _raise_status(msg)
        if kind != CMD_NAME or msg.get_int() != 1:
            raise _ProtocolError("expected one name in the answer to realpath")
        return str(msg.get_string().decode("utf-8", "surrogateescape"))

    def usable(self) -> bool:
        channel = self.sftp.get_channel()
        return channel is not None and not channel.closed and not channel.eof_received

    def close(self) -> None:
        try:
            self.sftp.close()
        except Exception:
            pass


def _raise_status(msg: paramiko.Message) -> None:
    code = msg.get_int()
    if code != SFTP_OK:
        raise _Status(code, msg.get_string().decode("utf-8", "replace"))


# SFTPAttributes._from_msg parses the attributes in an answer (not in paramiko's type stubs).
_attrs_from_msg: Callable[..., paramiko.SFTPAttributes] = getattr(  # noqa: B009
    paramiko.SFTPAttributes, "_from_msg"
)


def _attrs(msg: paramiko.Message) -> paramiko.SFTPAttributes:
    return _attrs_from_msg(msg)


def _new_file_attrs(mode: int) -> paramiko.SFTPAttributes:
    attrs = paramiko.SFTPAttributes()
    attrs.st_mode = mode
    return attrs


def _is_regular(attrs: paramiko.SFTPAttributes) -> bool:
    return attrs.st_mode is None or stat_module.S_ISREG(attrs.st_mode)


def _is_regular_file(attrs: paramiko.SFTPAttributes) -> bool:
    """A regular file, known to be one (unlike :func:`_is_regular`, which trusts a missing mode)."""
    return attrs.st_mode is not None and stat_module.S_ISREG(attrs.st_mode)


def _is_dir(attrs: paramiko.SFTPAttributes) -> bool:
    return attrs.st_mode is not None and stat_module.S_ISDIR(attrs.st_mode)


# --- host keys -----------------------------------------------------------------------------------


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"host key of {hostname} is not known")
        self.hostname = hostname
        self.key = key


class _RefuseUnknownHosts(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, raising an exception that carries the key."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise _UnknownHostKey(hostname, key)


# --- the backend ---------------------------------------------------------------------------------


class SFTPBackend:
    """Objects as files under ``path`` on an SSH server; see the module's description.

    ``path`` is absolute (``/srv/backups``) or relative to the login folder (``~/backups``,
    ``~``). ``key_files`` and ``known_hosts`` add to what ``~/.ssh`` offers; ``ssh_config`` is
    the OpenSSH client configuration to honour (None: none).
    """

    consistent_listing = (
        True  # one file system on the server: a listing shows every object stored before it
    )

    def __init__(
        self,
        host: str,
        path: str,
        *,
        user: str | None = None,
        port: int | None = None,
        key_files: Sequence[str] = (),
        known_hosts: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        ssh_config: str | None = "~/.ssh/config",
        allow_agent: bool = True,
        look_for_keys: bool = True,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        if not host or any(c in host for c in "/@ \t\n"):
            raise ValueError(f"invalid SSH host {host!r}")
        if timeout <= 0:
            raise ValueError("the timeout must be positive")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        self._relative, self._rel_path = _split_path(path)
        config = _ssh_config(host, ssh_config)
        self.host = config.get("hostname") or host
        self.port = port or _config_port(config, ssh_config) or DEFAULT_PORT
        self.user = user or config.get("user") or getpass.getuser()
        self._key_files = [os.path.expanduser(k) for k in key_files]
        for identity in config.get("identityfile") or []:
            expanded = os.path.expanduser(str(identity))
            if os.path.isfile(expanded) and expanded not in self._key_files:
                self._key_files.append(expanded)  # OpenSSH skips missing IdentityFiles too
        self._known_hosts = [os.path.expanduser(k) for k in known_hosts]
        self.timeout = timeout
        self._allow_agent = allow_agent
        self._look_for_keys = look_for_keys
        self._max_sessions = max_sessions
        shown_path = ("/~/" if self._relative else "/") + self._rel_path
        self._location = (
            f"sftp://{quote(user, safe='') + '@' if user else ''}"
            f"{f'[{host}]' if ':' in host else host}{f':{port}' if port else ''}"
            f"{shown_path.rstrip('/')}"
        )
        # An absolute root is known now; a relative one once the login folder is.
        self._root: str | None = None if self._relative else "/" + self._rel_path
        self._cond = threading.Condition()
        self._conn: _Conn | None = None
        self._connecting = False
        self._fsync = True
        self.connections = 0
        """How many SSH connections were made (for tests and diagnostics)."""

    def __repr__(self) -> str:
        return f"SFTPBackend({self._location!r})"

    @property
    def location(self) -> str:
        return self._location

    @property
    def transport(self) -> paramiko.Transport | None:
        """The current SSH connection's transport, if there is one (for diagnostics)."""
        with self._cond:
            return self._conn.transport if self._conn is not None else None

    @property
    def root(self) -> str | None:
        """The repository folder's absolute path on the server (once known)."""
        return self._root

    # --- connections ---------------------------------------------------------------------------

    @property
    def _server(self) -> str:
        return f"{self.host}:{self.port}"

    def _where(self, path: str) -> str:
        return f"{self.host}:{path}"

    def _connect(self) -> _Conn:
        client = paramiko.SSHClient()
        try:
            self._load_host_keys(client)
            client.set_missing_host_key_policy(_RefuseUnknownHosts())
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                # paramiko takes a list too (its type stubs say str)
                key_filename=cast(Any, list(self._key_files) or None),
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                channel_timeout=self.timeout,
                allow_agent=self._allow_agent,
                look_for_keys=self._look_for_keys,
            )
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("the connection closed during set-up")
            transport.set_keepalive(_KEEPALIVE)
        except BaseException as e:
            client.close()
            if isinstance(e, Exception):
                raise self._connect_error(e) from e
            raise
        self.connections += 1
        return _Conn(client, transport, self._max_sessions)

    def _load_host_keys(self, client: paramiko.SSHClient) -> None:
        client.load_system_host_keys()  # ~/.ssh/known_hosts, if there is one
        files = [f for f in ("/etc/ssh/ssh_known_hosts",) if os.path.isfile(f)]
        for path in [*files, *self._known_hosts]:
            try:
                client.load_system_host_keys(path)
            except (OSError, paramiko.SSHException, ValueError) as e:
                raise PermanentError(f"cannot read known hosts file {path}: {_reason(e)}") from e

    def _known_hosts_name(self) -> str:
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def _connect_error(self, e: Exception) -> BackendError:
        if isinstance(e, BackendError):
            return e
        target = f"{self.user}@{self.host}" + (f":{self.port}" if self.port != DEFAULT_PORT else "")
        port_flag = f"-p {self.port} " if self.port != DEFAULT_PORT else ""
        add = (
            f"check the fingerprint with the server's administrator, then add the key with "
            f"'ssh-keyscan {port_flag}{self.host} >> ~/.ssh/known_hosts' or by running "
            f"'ssh {port_flag}{self.user}@{self.host}' once (or name a file with "
            f"-o sftp.known-hosts=FILE)"
        )
        if isinstance(e, _UnknownHostKey):
            return PermanentError(
                f"host key of {self._known_hosts_name()} is not known ({_fingerprint(e.key)}): "
                + add
            )
        if isinstance(e, paramiko.BadHostKeyException):
            return PermanentError(
                f"host key of {self._known_hosts_name()} has CHANGED (the server sent "
                f"{_fingerprint(e.key)}, known_hosts has {_fingerprint(e.expected_key)}): "
                f"someone may be intercepting the connection; if the server's key was "
                f"changed on purpose, remove the old one with "
                f"\"ssh-keygen -R '{self._known_hosts_name()}'\" and {add}"
            )
        if isinstance(e, paramiko.AuthenticationException) or (
            isinstance(e, paramiko.SSHException) and "authentication" in str(e).lower()
        ):
            return PermanentError(
                f"authentication failed for {target}: {_reason(e)} (offer a key the server "
                f"accepts: -o sftp.key-file=PATH, the SSH agent or ~/.ssh/config IdentityFile)"
            )
        if isinstance(e, paramiko.ssh_exception.IncompatiblePeer):
            return PermanentError(f"cannot talk to {self._server}: {_reason(e)}")
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError) and e.filename:
            # paramiko lets an unreadable key file's error through
            return PermanentError(
                f"authentication failed for {target}: cannot read {e.filename}: {_reason(e)}"
            )
        if isinstance(e, OSError | EOFError | paramiko.SSHException):
            return TransientError(f"cannot reach {self._server}: {_reason(e)}")
        return PermanentError(f"cannot connect to {self._server}: {_reason(e)}")

    def _acquire(self) -> _Session:
        """A session of the current connection (connecting if there is none)."""
        while True:
            with self._cond:
                conn = self._conn
                if conn is not None and not conn.active():
                    self._drop_locked(conn)
                    conn = None
                if conn is None:
                    if self._connecting:
                        self._cond.wait(self.timeout)
                        continue
                    self._connecting = True
                elif conn.idle:
                    conn.busy += 1
                    session = conn.idle.pop()
                    if session.usable():
                        return session
                    conn.busy -= 1
                    session.close()
                    continue
                elif conn.busy < conn.limit:
                    conn.busy += 1
                else:
                    self._cond.wait(self.timeout)
                    continue
            if conn is None:
                self._connect_now()
                continue
            session_or_retry = self._new_session(conn)
            if session_or_retry is None:
                continue
            return session_or_retry

    def _new_session(self, conn: _Conn) -> _Session | None:
        """A new session on ``conn`` (counted as busy already); None: wait for an idle one."""
        try:
            sftp = conn.client.open_sftp()
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(self.timeout)
            session = _Session(conn, sftp)
        except Exception as e:
            with self._cond:
                conn.busy -= 1
                self._cond.notify_all()
                active = conn.active()
                timed_out = isinstance(e, socket.timeout | TimeoutError) or (
                    "timeout" in str(e).lower()
                )
                if isinstance(e, paramiko.SSHException) and active and not timed_out:
                    # Refused (OpenSSH's MaxSessions; paramiko raises ChannelException, or a
                    # bare "Unable to open channel" when threads race for the reason).
                    open_now = conn.busy + len(conn.idle)
                    if open_now > 0:
                        conn.limit = open_now  # wait for one of the sessions open now
                        return None
                if not active:
                    self._drop_locked(conn)
            if not active:
                raise TransientError(f"connection to {self._server} lost: {_reason(e)}") from e
            if timed_out:
                raise TransientError(
                    f"no answer from {self._server} within {self.timeout:g} s "
                    f"(opening an SFTP session)"
                ) from e
            raise PermanentError(
                f"cannot start SFTP on {self._server}: {_reason(e)} "
                f"(does the server offer the sftp subsystem?)"
            ) from e
        except BaseException:
            with self._cond:
                conn.busy -= 1
                self._cond.notify_all()
            raise
        if self._root is None:
            try:
                self._resolve_root(session)
            except BaseException:
                self._release(session, healthy=False)
                raise
        return session

    def _connect_now(self) -> None:
        try:
            conn = self._connect()
        except BaseException:
            with self._cond:
                self._connecting = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._conn = conn
            self._connecting = False
            self._cond.notify_all()

    def _resolve_root(self, session: _Session) -> None:
        try:
            home = session.realpath(".")
        except _Status as e:
            raise PermanentError(
                f"cannot find the login folder of {self.user} on {self.host}: {e.text}"
            ) from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._drop(session.conn)
            raise TransientError(f"connection to {self._server} lost: {_reason(e)}") from e
        home = home.rstrip("/")
        self._root = f"{home}/{self._rel_path}" if self._rel_path else home or "/"

    def _release(self, session: _Session, *, healthy: bool) -> None:
        conn = session.conn
        with self._cond:
            conn.busy -= 1
            keep = healthy and conn is self._conn and conn.active()
            if keep:
                conn.idle.append(session)
            self._cond.notify_all()
        if not keep:
            session.close()

    def _drop(self, conn: _Conn) -> None:
        with self._cond:
            self._drop_locked(conn)

    def _drop_locked(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
        idle, conn.idle = conn.idle, []
        for session in idle:
            session.close()
        conn.client.close()

    def _run(self, op: str, name: str, fn: Callable[[_Session], T]) -> T:
        """``fn(session)`` with a session; connection trouble becomes TransientError.

        ``fn`` raises :class:`_Status` for error answers it does not handle itself (mapped here
        for ``op`` on ``name``); the session goes back to the pool only after a success,
        NotFound or AlreadyExists (which ``fn`` raises with no request left unanswered).
        """
        session = self._acquire()
        healthy = False
        try:
            result = fn(session)
            healthy = True
            return result
        except (NotFound, AlreadyExists):
            healthy = True
            raise
        except BackendError:
            raise
        except _Status as e:
            raise self._status_error(e, op, name, self._object_path(name)) from e
        except _ProtocolError as e:
            raise PermanentError(f"cannot {op} {self._where(self._object_path(name))}: {e}") from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._drop(session.conn)
            if isinstance(e, socket.timeout | TimeoutError):
                raise TransientError(
                    f"no answer from {self._server} within {self.timeout:g} s "
                    f"({op} {name or self._root})"
                ) from e
            raise TransientError(
                f"connection to {self._server} lost ({op} {name or self._root}): {_reason(e)}"
            ) from e
        finally:
            self._release(session, healthy=healthy)

    # --- helpers -------------------------------------------------------------------------------

    def _object_path(self, name: str) -> str:
        root = self._root if self._root is not None else "~/" + self._rel_path
        return f"{root.rstrip('/')}/{name}" if name else root

    def _status_error(self, e: _Status, op: str, name: str, path: str) -> BackendError:
        where = self._where(path)
        if e.code == SFTP_NO_SUCH_FILE and name and op in ("load", "stat", "delete"):
            return NotFound(f"{name} not found in {self._location}")
        if e.code == SFTP_PERMISSION_DENIED:
            return PermanentError(f"permission denied on {where} ({op})")
        return PermanentError(f"cannot {op} {where}: {_one_line(e.text)}")

    def _write_error(self, session: _Session, e: _Status, path: str) -> BackendError:
        if e.code == SFTP_PERMISSION_DENIED:
            return PermanentError(f"permission denied on {self._where(path)} (store)")
        if e.code == SFTP_FAILURE:
            # SFTP v3 has no "disk full" status: OpenSSH answers ENOSPC and EDQUOT (and EROFS,
            # EIO, ...) with the generic "Failure". Ask the server about free space to tell.
            free = self._free_space(session, posixpath.dirname(path))
            if free is not None and free < CHUNK * WINDOW:
                return PermanentError(
                    f"write failed on {self._where(path)}: disk full or quota exceeded on the "
                    f"server ({free} bytes free)"
                )
            return PermanentError(
                f"write failed on {self._where(path)}: {_one_line(e.text)} (the server does not "
                f"say why: disk full or quota exceeded? a read-only file system?)"
            )
        return PermanentError(f"write failed on {self._where(path)}: {_one_line(e.text)}")

    def _free_space(self, session: _Session, path: str) -> int | None:
        """Bytes free for the login user where ``path`` lives (statvfs@openssh.com), if known."""
        try:
            kind, msg = session.call(CMD_EXTENDED, "statvfs@openssh.com", path)
            if kind != CMD_EXTENDED_REPLY:
                return None
            msg.get_int64()  # f_bsize
            frsize = msg.get_int64()
            msg.get_int64()  # f_blocks
            msg.get_int64()  # f_bfree
            bavail = msg.get_int64()
            return int(frsize * bavail)
        except _Status:
            return None

    def _root_missing(self) -> PermanentError:
        return PermanentError(f"repository folder {self._where(self._root or '/')} does not exist")

    def _mkdirs(self, session: _Session, directory: str) -> None:
        """Make ``directory`` and its missing parents below the root (which must exist)."""
        below = (self._root or "/").rstrip("/") + "/"
        if not directory.startswith(below):
            raise self._root_missing()  # the root itself is missing: never made here
        try:
            self._mkdir(session, directory)
        except _Status as e:
            if e.code != SFTP_NO_SUCH_FILE:
                raise
            self._mkdirs(session, posixpath.dirname(directory))
            self._mkdir(session, directory)

    @staticmethod
    def _mkdir(session: _Session, directory: str) -> None:
        """Make one folder; one that exists already (made meanwhile) is fine."""
        try:
            session.status(CMD_MKDIR, directory, _new_file_attrs(_DIR_MODE))
            return
        except _Status as e:
            if e.code in (SFTP_NO_SUCH_FILE, SFTP_PERMISSION_DENIED):
                raise
            failure = e
        # "Failure": most likely it exists (OpenSSH answers EEXIST so).
        try:
            attrs = session.attrs(CMD_STAT, directory)
        except _Status:
            raise failure from None
        if not _is_dir(attrs):
            raise failure

    def _read(self, session: _Session, path: str, offset: int, length: int | None) -> bytes | None:
        """The bytes ``[offset, offset + length)`` of the file (clipped); None if it is missing."""
        try:
            handle = session.handle(CMD_OPEN, path, SFTP_FLAG_READ, paramiko.SFTPAttributes())
        except _Status as e:
            if e.code == SFTP_NO_SUCH_FILE:
                return None
            raise
        attrs = session.attrs(CMD_FSTAT, handle)
        if not _is_regular(attrs):
            session.call(CMD_CLOSE, handle)
            return None  # a folder is not an object
        size = attrs.st_size or 0
        end = size if length is None else min(size, offset + length)
        data = self._read_range(session, handle, offset, end, path) if offset < end else b""
        session.call(CMD_CLOSE, handle)  # the answer does not matter for a read
        return data

    def _read_range(
        self, session: _Session, handle: bytes, start: int, end: int, path: str
    ) -> bytes:
        buf = bytearray(end - start)
        todo: deque[tuple[int, int]] = deque(
            (pos, min(CHUNK, end - pos)) for pos in range(start, end, CHUNK)
        )
        inflight: dict[int, tuple[int, int]] = {}
        while todo or inflight:
            while todo and len(inflight) < WINDOW:
                pos, size = todo.popleft()
                inflight[session.send(CMD_READ, handle, int64(pos), size)] = (pos, size)
            for num, kind, msg in session.wait_some(inflight):
                pos, size = inflight.pop(num)
                if kind == CMD_DATA:
                    data = msg.get_string()
                    got = len(data)
                    if got == 0 or got > size:
                        raise _ProtocolError(f"read of {got} bytes where {size} were asked")
                    buf[pos - start : pos - start + got] = data
                    if got < size:  # servers may answer with less: ask for the rest
                        todo.appendleft((pos + got, size - got))
                elif kind == CMD_STATUS:
                    code = msg.get_int()
                    if code == SFTP_EOF:
                        raise TransientError(
                            f"short read of {self._where(path)}: it ended at {pos} bytes, "
                            f"{end} expected (changed while read?)"
                        )
                    raise _Status(code, msg.get_string().decode("utf-8", "replace"))
                else:
                    raise _ProtocolError(f"expected data, got message type {kind}")
        return bytes(buf)

    def _write(self, session: _Session, handle: bytes, view: memoryview) -> None:
        """Write all of ``view``, fsync (if the server can) and close the handle.

        The requests are pipelined; every answer is checked, the first error is raised once
        the handle is closed.
        """
        error: _Status | None = None
        pending: deque[int] = deque()

        def collect(num: int) -> None:
            nonlocal error
            kind, msg = session.wait(num)
            try:
                _Session.check(kind, msg)
            except _Status as e:
                error = error or e

        for pos in range(0, len(view), CHUNK):
            pending.append(session.send(CMD_WRITE, handle, int64(pos), view[pos : pos + CHUNK]))
            while len(pending) >= WINDOW:
                collect(pending.popleft())
            if error is not None:
                break
        fsync = None
        if self._fsync and error is None:
            fsync = session.send(CMD_EXTENDED, "fsync@openssh.com", handle)
        close = session.send(CMD_CLOSE, handle)
        while pending:
            collect(pending.popleft())
        if fsync is not None:
            kind, msg = session.wait(fsync)
            try:
                _Session.check(kind, msg)
            except _Status as e:
                if e.code == SFTP_OP_UNSUPPORTED:
                    self._fsync = False  # not OpenSSH (or older than 6.5): nothing to be done
                else:
                    error = error or e
        collect(close)
        if error is not None:
            raise error

    def _remove_quietly(self, session: _Session, path: str) -> None:
        try:
            session.status(CMD_REMOVE, path)
        except _Status:
            pass

    def _same_content(self, session: _Session, path: str, view: memoryview) -> bool | None:
        """Whether the file at ``path`` holds exactly ``view``; None if there is none."""
        data = self._read(session, path, 0, None)
        if data is None:
            try:
                session.attrs(CMD_STAT, path)
            except _Status as e:
                if e.code == SFTP_NO_SUCH_FILE:
                    return None
                raise
            return False  # something else than a file (a folder): not the same
        return data == view

    # --- the Backend protocol ------------------------------------------------------------------

    def create(self) -> None:
        self._run("create", "", self._create)

    def _create(self, session: _Session) -> None:
        root = self._root or "/"
        try:
            attrs = session.attrs(CMD_STAT, root)
        except _Status as e:
            if e.code != SFTP_NO_SUCH_FILE:
                raise
        else:
            if not _is_dir(attrs):
                raise PermanentError(
                    f"cannot create {self._where(root)}: it exists and is not a folder"
                )
            return
        # Make it and its missing parents, top down.
        missing: list[str] = []
        path = root
        while path not in ("/", ""):
            try:
                attrs = session.attrs(CMD_STAT, path)
            except _Status as e:
                if e.code != SFTP_NO_SUCH_FILE:
                    raise
                missing.append(path)
                path = posixpath.dirname(path)
                continue
            if not _is_dir(attrs):
                raise PermanentError(f"cannot create {self._where(root)}: {path} is not a folder")
            break
        for path in reversed(missing):
            try:
                session.status(CMD_MKDIR, path, _new_file_attrs(_DIR_MODE))
            except _Status as e:
                try:
                    if _is_dir(session.attrs(CMD_STAT, path)):
                        continue  # made meanwhile
                except _Status:
                    pass
                if e.code == SFTP_PERMISSION_DENIED:
                    raise PermanentError(
                        f"cannot create {self._where(root)}: permission denied ({path})"
                    ) from e
                raise PermanentError(f"cannot create {self._where(path)}: {e.text}") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return iter(self._run("list", prefix, lambda s: self._walk(s, prefix)))

    def _walk(
        self,
        session: _Session,
        prefix: str,
        temporaries: builtins.list[tuple[str, int | None]] | None = None,
    ) -> builtins.list[ObjectInfo]:
        """Every object under ``prefix``: folders are read ``DIR_WINDOW`` at a time.

        With ``temporaries``, the temporary files found on the way are added to it as
        ``(name, modification time)``.
        """
        cut = prefix.rfind("/") + 1
        root = self._root or "/"
        found: builtins.list[ObjectInfo] = []
        # (relative folder with a trailing "/" or "", required start of the entry names)
        waiting: deque[tuple[str, str]] = deque([(prefix[:cut], prefix[cut:])])
        # request number -> (step, relative folder, name filter, handle)
        inflight: dict[int, tuple[str, str, str, bytes]] = {}
        error: _Status | None = None
        while waiting or inflight:
            while waiting and len(inflight) < DIR_WINDOW and error is None:
                rel, start = waiting.popleft()
                path = f"{root.rstrip('/')}/{rel.rstrip('/')}" if rel else root
                inflight[session.send(CMD_OPENDIR, path)] = ("open", rel, start, b"")
            if not inflight:
                break
            for num, kind, msg in session.wait_some(inflight):
                step, rel, start, handle = inflight.pop(num)
                if step == "close":
                    continue
                if kind == CMD_STATUS:
                    code = msg.get_int()
                    text = msg.get_string().decode("utf-8", "replace")
                    if step == "read" and code == SFTP_EOF:
                        inflight[session.send(CMD_CLOSE, handle)] = ("close", rel, "", handle)
                    elif step == "open" and code == SFTP_NO_SUCH_FILE:
                        continue  # no such folder (or it vanished): nothing in it
                    else:
                        error = error or _Status(code, text)
                        if step == "read":
                            inflight[session.send(CMD_CLOSE, handle)] = ("close", rel, "", handle)
                    continue
                if step == "open" and kind == CMD_HANDLE:
                    handle = bytes(msg.get_binary())
                elif step == "read" and kind == CMD_NAME:
                    self._entries(msg, rel, start, waiting, found, temporaries)
                else:
                    raise _ProtocolError(f"unexpected answer type {kind} while listing")
                if error is None:
                    inflight[session.send(CMD_READDIR, handle)] = ("read", rel, start, handle)
                else:
                    inflight[session.send(CMD_CLOSE, handle)] = ("close", rel, "", handle)
        if error is not None:
            raise error
        return found

    @staticmethod
    def _entries(
        msg: paramiko.Message,
        rel: str,
        start: str,
        waiting: deque[tuple[str, str]],
        found: builtins.list[ObjectInfo],
        temporaries: builtins.list[tuple[str, int | None]] | None = None,
    ) -> None:
        for _ in range(msg.get_int()):
            raw = msg.get_string()
            longname = msg.get_string()
            attrs = _attrs_from_msg(msg, None, longname)
            try:
                entry = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # not a name safehold makes
            if entry in (".", "..") or not entry.startswith(start):
                continue
            name = rel + entry
            if _is_dir(attrs):
                waiting.append((name + "/", ""))
                continue
            if entry.startswith(TMP_PREFIX):
                if temporaries is not None and _is_regular_file(attrs):
                    temporaries.append((name, attrs.st_mtime))
                continue
            if attrs.st_mode is None:
                continue
            if not stat_module.S_ISREG(attrs.st_mode):
                continue
            try:
                check_name(name)
            except ValueError:
                continue
            found.append(ObjectInfo(name, attrs.st_size or 0))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        check_range(offset, length)

        def load(session: _Session) -> bytes:
            data = self._read(session, self._object_path(name), offset, length)
            if data is None:
                raise NotFound(f"{name} not found in {self._location}")
            return data

        return self._run("load", name, load)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        check_name(name)
        view = byte_view(data)
        self._run("store", name, lambda s: self._store(s, name, view, overwrite))

    def _store(self, session: _Session, name: str, view: memoryview, overwrite: bool) -> None:
        path = self._object_path(name)
        directory = posixpath.dirname(path)
        made_dirs = False
        while True:
            tmp = f"{directory}/{TMP_PREFIX}{os.urandom(8).hex()}"
            try:
                handle = session.handle(
                    CMD_OPEN,
                    tmp,
                    SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL,
                    _new_file_attrs(_FILE_MODE),
                )
                break
            except _Status as e:
                if e.code == SFTP_NO_SUCH_FILE and not made_dirs:
                    self._mkdirs(session, directory)
                    made_dirs = True
                    continue
                raise self._write_error(session, e, path) from e
        published = False
        try:
            try:
                self._write(session, handle, view)
            except _Status as e:
                raise self._write_error(session, e, path) from e
            if overwrite:
                self._replace(session, tmp, path)
                published = True
            else:
                published = self._publish(session, name, tmp, path, view)
        finally:
            if not published:
                self._remove_quietly(session, tmp)

    def _replace(self, session: _Session, tmp: str, path: str) -> None:
        try:
            session.status(CMD_EXTENDED, "posix-rename@openssh.com", tmp, path)
            return
        except _Status as e:
            if e.code != SFTP_OP_UNSUPPORTED:
                raise
        # A server without posix-rename: remove, then rename (not atomic; only locks do this).
        try:
            session.status(CMD_REMOVE, path)
        except _Status as e:
            if e.code != SFTP_NO_SUCH_FILE:
                raise
        session.status(CMD_RENAME, tmp, path)

    def _publish(self, session: _Session, name: str, tmp: str, path: str, view: memoryview) -> bool:
        """Rename ``tmp`` to ``path`` if that is free; True if it did (else tmp is left)."""
        refused: _Status | None = None
        for _ in range(_STORE_ROUNDS):
            try:
                session.status(CMD_RENAME, tmp, path)
                return True
            except _Status as e:
                if e.code == SFTP_PERMISSION_DENIED:
                    raise
                refused = e
            same = self._same_content(session, path, view)
            if same is True:
                return False
            if same is False:
                raise AlreadyExists(
                    f"{name} already exists in {self._location} with different content"
                )
            # No object there: deleted meanwhile, or the rename failed for another reason.
        raise PermanentError(
            f"cannot store {self._where(path)}: the server refuses to rename {tmp} to it: "
            f"{refused.text if refused else 'unknown'}"
        )

    def delete(self, name: str) -> None:
        check_name(name)

        def delete(session: _Session) -> None:
            path = self._object_path(name)
            try:
                attrs = session.attrs(CMD_STAT, path)
                if not _is_regular(attrs):
                    raise NotFound(f"{name} not found in {self._location}")
                session.status(CMD_REMOVE, path)
            except _Status as e:
                raise self._status_error(e, "delete", name, path) from e

        self._run("delete", name, delete)

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)

        def stat(session: _Session) -> ObjectInfo:
            path = self._object_path(name)
            try:
                attrs = session.attrs(CMD_STAT, path)
            except _Status as e:
                raise self._status_error(e, "stat", name, path) from e
            if not _is_regular(attrs):
                raise NotFound(f"{name} not found in {self._location}")
            return ObjectInfo(name, attrs.st_size or 0)

        return self._run("stat", name, stat)

    def close(self) -> None:
        with self._cond:
            conn = self._conn
            if conn is not None:
                self._drop_locked(conn)

    # --- beyond the protocol -------------------------------------------------------------------

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """Remove the temporary files (``.tmp-…``) of interrupted stores whose modification
        time, as the server reports it, is more than ``older_than_s`` seconds before now (this
        machine's clock); their names relative to the repository folder.

        See :class:`~safehold.backends.base.CleansTemporaries`. A temporary without a
        modification time (a server that sends none) is left alone.
        """
        cutoff = time.time() - check_older_than(older_than_s)

        def clean(session: _Session) -> builtins.list[str]:
            temporaries: builtins.list[tuple[str, int | None]] = []
            self._walk(session, "", temporaries)
            removed: builtins.list[str] = []
            for name, mtime in temporaries:
                if mtime is None or mtime >= cutoff:
                    continue  # young (its store may still be under way), or of unknown age
                path = self._object_path(name)
                try:
                    session.status(CMD_REMOVE, path)
                except _Status as e:
                    if e.code == SFTP_NO_SUCH_FILE:
                        continue  # published or removed meanwhile
                    raise self._status_error(e, "remove", name, path) from e
                removed.append(name)
            return removed

        return self._run("clean", "", clean)


# --- opening from a URL --------------------------------------------------------------------------


def _split_path(path: str) -> tuple[bool, str]:
    """``("/srv/r")`` → (False, "srv/r"); ``("~/r")`` → (True, "r"); ``("~")`` → (True, "")."""
    relative = path == "~" or path.startswith("~/")
    rest = path[1:] if relative else path
    if not relative and not path.startswith("/"):
        raise ValueError(f"the path {path!r} must be absolute (or start with ~/)")
    rest = rest.strip("/")
    if not rest and not relative:
        raise ValueError("the path names no folder (the server's root folder is not allowed)")
    if rest:
        try:
            check_name(rest)
        except ValueError:
            raise ValueError(f"invalid path {path!r}") from None
    return relative, rest


def _ssh_config(host: str, path: str | None) -> dict[str, Any]:
    """The settings of ``~/.ssh/config`` (or ``path``) for ``host``; {} without a file."""
    if path is None:
        return {}
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return {}
    try:
        return dict(paramiko.SSHConfig.from_path(path).lookup(host))
    except Exception as e:
        raise PermanentError(f"cannot read the SSH configuration {path}: {_reason(e)}") from e


def _config_port(config: Mapping[str, Any], path: str | None) -> int | None:
    value = config.get("port")
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        raise PermanentError(f"invalid Port {value!r} in {path}") from None
    if not 0 < port < 65536:
        raise PermanentError(f"invalid Port {value!r} in {path}")
    return port


def open_sftp(url: str, options: Mapping[str, str]) -> Backend:
    """``sftp://[user@]host[:port]/path`` with the ``sftp.*`` options, behind a RetryingBackend."""
    from safehold.backends.wrappers import RetryingBackend

    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise UsageError(f"SFTP URL {url!r} must not have a query or fragment")
    if parts.password is not None:
        raise UsageError(f"SFTP URL {url!r} holds a password; safehold authenticates with keys")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        raise UsageError(f"invalid SFTP URL {url!r}: {e}") from None
    if not host:
        raise UsageError(f"SFTP URL {url!r} names no host; use sftp://user@host/absolute/path")
    user = unquote(parts.username) if parts.username else None
    path = unquote(parts.path)
    if path == "/~" or path.startswith("/~/"):
        path = path[1:]
    if not path.strip("/"):
        raise UsageError(
            f"SFTP URL {url!r} names no folder; use sftp://user@host/absolute/path "
            f"or sftp://user@host/~/path (relative to the login folder)"
        )
    timeout = DEFAULT_TIMEOUT
    if "sftp.timeout" in options:
        try:
            timeout = float(options["sftp.timeout"])
        except ValueError:
            timeout = 0
        if not 0 < timeout < 1e6:
            raise UsageError(f"invalid sftp.timeout {options['sftp.timeout']!r} (seconds, e.g. 30)")
    key_files: list[str] = []
    if options.get("sftp.key-file"):
        key_file = os.path.expanduser(options["sftp.key-file"])
        if not os.path.isfile(key_file):
            raise UsageError(f"SSH key file {key_file} does not exist")
        key_files.append(key_file)
    known_hosts: list[str] = []
    if options.get("sftp.known-hosts"):
        known = os.path.expanduser(options["sftp.known-hosts"])
        if not os.path.isfile(known):
            raise UsageError(f"known hosts file {known} does not exist")
        known_hosts.append(known)
    try:
        backend = SFTPBackend(
            host,
            path,
            user=user,
            port=port,
            key_files=key_files,
            known_hosts=known_hosts,
            timeout=timeout,
        )
    except ValueError as e:
        raise UsageError(f"{e} in {url!r}") from None
    return RetryingBackend(backend)
