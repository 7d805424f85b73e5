"""``ssh://user@host[:port]/path``: a repository served by ``safehold serve`` over SSH.

The client starts ``$SAFEHOLD_RSH user@host safehold serve`` (``SAFEHOLD_RSH`` defaults to
``ssh``; it is split like a shell word list, e.g. ``ssh -i key -o BatchMode=yes``) and speaks a
small request/response protocol over the command's stdin and stdout. On the server,
``safehold serve --restrict-to-path DIR [--append-only]`` is meant to be the forced command of an
``authorized_keys`` line (one line; see README.md), so that the key can reach nothing but the
repositories under DIR::

    command="/usr/local/bin/safehold serve --restrict-to-path /srv/backups/laptop
    --append-only",restrict ssh-ed25519 AAAA... laptop

The protocol: every message is a 4-byte big-endian length and a msgpack map. The client's first
message is ``{"op": "hello", "v": 1, "path": PATH}``; then one request per message, each answered
by ``{"ok": true, ...}`` or ``{"error": KIND, "message": TEXT}`` where KIND names the exception
(``NotFound``, ``AlreadyExists``, ``TransientError``, ``PermanentError``, ``UsageError``).

With ``--append-only`` the server, whatever the client sends, only creates new objects named
``data/<xx>/<id>``, ``index/<id>``, ``snapshots/<id>`` and ``locks/<id>``, and only overwrites and
deletes ``locks/<id>`` (lock objects are overwritten while they live and deleted when released);
it refuses everything else, ``plans/``, ``keys/``, ``config`` and ``create`` included: stored
data can only be added to, and the client cannot plant a prune plan for the owner's next prune.
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import msgpack

from safehold.backends.base import Backend, ObjectInfo
from safehold.backends.local import LocalBackend, check_name, check_prefix, check_range
from safehold.errors import (
    AlreadyExists,
    BackendError,
    NotFound,
    PermanentError,
    TransientError,
    UsageError,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 30
_LEN = struct.Struct(">I")
_ERRORS: dict[str, type[BackendError] | type[UsageError]] = {
    "NotFound": NotFound,
    "AlreadyExists": AlreadyExists,
    "TransientError": TransientError,
    "PermanentError": PermanentError,
    "UsageError": UsageError,
}


def write_message(out: IO[bytes], obj: dict[str, Any]) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    out.write(_LEN.pack(len(data)))
    out.write(data)
    out.flush()


def read_message(inp: IO[bytes]) -> dict[str, Any] | None:
    """The next message, or None at a clean end of the stream."""
    head = _read_exact(inp, 4)
    if not head:
        return None
    if len(head) != 4:
        raise TransientError("the connection closed in the middle of a message")
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise PermanentError(f"protocol message of {n} bytes is too large")
    body = _read_exact(inp, n)
    if len(body) != n:
        raise TransientError("the connection closed in the middle of a message")
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as e:  # msgpack raises several kinds on malformed input
        raise PermanentError(f"malformed protocol message ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise PermanentError("protocol message is not a map")
    return obj


def _read_exact(inp: IO[bytes], n: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        chunk = inp.read(min(n - got, 1 << 20))  # never allocate what was only claimed
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# --- the server -----------------------------------------------------------------------------


class Server:
    """Answers requests for one repository under ``root``, refusing what the options forbid."""

    def __init__(self, root: str, *, append_only: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.append_only = append_only
        self.backend: LocalBackend | None = None
        self.path = ""  # the repository path the client asked for in hello

    def _open(self, path: str) -> LocalBackend:
        """The repository at ``path``: an absolute path inside the root, or a path relative to
        it; anything that resolves outside the root (``..``, symlinks) is refused."""
        if not isinstance(path, str) or not path:
            raise UsageError("no repository path given")
        joined = path if os.path.isabs(path) else os.path.join(self.root, path)
        full = os.path.realpath(joined)
        if full != self.root and not full.startswith(self.root.rstrip(os.sep) + os.sep):
            raise PermanentError(f"{path} is outside the path this key may use")
        return LocalBackend(full)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "hello":
            if req.get("v") != PROTOCOL_VERSION:
                raise PermanentError(f"unsupported protocol version {req.get('v')!r}")
            self.path = str(req.get("path", ""))
            self.backend = self._open(self.path)
            return {"ok": True, "v": PROTOCOL_VERSION, "append_only": self.append_only}
        b = self.backend
        if b is None:
            raise PermanentError("the first request must be hello")
        name = req.get("name", "")
        if op == "list":
            items = [[i.name, i.size] for i in b.list(str(req.get("prefix", "")))]
            return {"ok": True, "items": items}
        if op == "load":
            return {"ok": True, "data": b.load(name, int(req.get("offset", 0)), req.get("length"))}
        if op == "stat":
            return {"ok": True, "size": b.stat(name).size}
        if op == "store":
            overwrite = bool(req.get("overwrite", False))
            if self.append_only:
                _check_append_only("overwrite" if overwrite else "store", name)
            data = req.get("data")
            if not isinstance(data, bytes):
                raise PermanentError("store without data")
            b.store(name, data, overwrite=overwrite)
            return {"ok": True}
        if op == "delete":
            if self.append_only:
                _check_append_only("delete", name)
            b.delete(name)
            return {"ok": True}
        if op == "create":
            if self.append_only:
                raise PermanentError(
                    f"the server is append-only: refusing to create a repository at {self.path}"
                )
            b.create()
            return {"ok": True}
        raise PermanentError(f"unknown request {op!r}")

    def serve(self, inp: IO[bytes], out: IO[bytes]) -> None:
        while True:
            try:
                req = read_message(inp)
            except BackendError as e:  # out of step with the client: say why and stop
                write_message(out, {"error": "PermanentError", "message": str(e)})
                return
            if req is None:
                return
            try:
                resp = self.handle(req)
            except (BackendError, UsageError, ValueError) as e:
                kind = type(e).__name__ if type(e).__name__ in _ERRORS else "PermanentError"
                resp = {"error": kind, "message": str(e)}
            write_message(out, resp)


_HEX = frozenset("0123456789abcdef")


def _is_id(text: str) -> bool:
    """64 lowercase hex digits: an object id (docs/format.md §1)."""
    return len(text) == 64 and all(c in _HEX for c in text)


def _append_only_kind(name: str) -> str | None:
    """``"lock"`` for ``locks/<id>``; ``"add"`` for the other names an append-only client may
    create (``data/<xx>/<id>`` with ``<xx>`` = ``<id>[:2]``, ``index/<id>``,
    ``snapshots/<id>``); None for every other name."""
    parts = name.split("/")
    if len(parts) == 2 and _is_id(parts[1]):
        if parts[0] == "locks":
            return "lock"
        if parts[0] in ("index", "snapshots"):
            return "add"
    if len(parts) == 3 and parts[0] == "data" and _is_id(parts[2]) and parts[1] == parts[2][:2]:
        return "add"
    return None


def _check_append_only(action: str, name: Any) -> None:
    """Raise PermanentError unless an append-only server may ``action`` (``"store"``: create
    if absent; ``"overwrite"``; ``"delete"``) the object ``name``: it may create
    ``data/<xx>/<id>``, ``index/<id>``, ``snapshots/<id>`` and ``locks/<id>``, and overwrite
    and delete ``locks/<id>``; nothing else (not ``plans/``, ``keys/`` or ``config``)."""
    check_name(name)  # a malformed name is refused as such (ValueError), before any rule
    kind = _append_only_kind(name)
    if kind == "lock" or (kind == "add" and action == "store"):
        return
    raise PermanentError(
        f"the server is append-only: refusing to {action} {name} (a client may only add "
        "data/, index/, snapshots/ and locks/ objects, and overwrite or delete locks/ objects)"
    )


# --- the client -----------------------------------------------------------------------------


class RemoteBackend:
    """A Backend that talks to ``safehold serve`` through a command (normally ssh)."""

    consistent_listing = True  # the server lists its own file system

    def __init__(self, url: str, command: list[str], path: str) -> None:
        self.url = url
        self._command = command
        self._path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.url

    def _connect(self) -> subprocess.Popen[bytes]:
        try:
            proc = subprocess.Popen(
                self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as e:
            raise PermanentError(f"cannot run {self._command[0]!r}: {e.strerror}") from None
        self._proc = proc
        try:
            self._exchange({"op": "hello", "v": PROTOCOL_VERSION, "path": self._path})
        except BackendError:
            self._drop()
            raise
        return proc

    def _drop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
            proc.kill()
            proc.wait()

    def _exchange(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            write_message(proc.stdin, req)
            resp = read_message(proc.stdout)
        except (OSError, ValueError) as e:
            resp = None
            why = str(e)
        else:
            why = "the connection closed"
        if resp is None:
            err = b""
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read()[-500:]
            self._proc = None
            detail = err.decode(errors="replace").strip().splitlines()
            raise TransientError(f"{self.url}: {why}" + (f": {detail[-1]}" if detail else ""))
        if "error" in resp:
            kind = _ERRORS.get(str(resp["error"]), PermanentError)
            raise kind(f"{self.url}: {resp.get('message', '')}")
        return resp

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._proc is None:
                self._connect()
            return self._exchange(req)

    def create(self) -> None:
        self._call({"op": "create"})

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        items = self._call({"op": "list", "prefix": prefix})["items"]
        return iter([ObjectInfo(str(n), int(s)) for n, s in items])

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        check_range(offset, length)
        data = self._call({"op": "load", "name": name, "offset": offset, "length": length})["data"]
        if not isinstance(data, bytes):
            raise PermanentError(f"{self.url}: malformed answer to load")
        return data

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        check_name(name)
        self._call({"op": "store", "name": name, "data": bytes(data), "overwrite": overwrite})

    def delete(self, name: str) -> None:
        check_name(name)
        self._call({"op": "delete", "name": name})

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        return ObjectInfo(name, int(self._call({"op": "stat", "name": name})["size"]))

    def close(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is not None and proc.stdin is not None:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._drop()


def open_ssh(url: str) -> Backend:
    """``ssh://[user@]host[:port]/path``; the command comes from ``SAFEHOLD_RSH`` (``ssh``)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.path:
        raise UsageError(f"invalid ssh repository URL {url!r} (expected ssh://user@host/path)")
    rsh = shlex.split(os.environ.get("SAFEHOLD_RSH", "ssh"))
    dest = parts.hostname if parts.username is None else f"{parts.username}@{parts.hostname}"
    port = ["-p", str(parts.port)] if parts.port else []
    path = unquote(parts.path)
    if path.startswith("/~/"):
        path = path[3:]  # relative to the restricted root (or the login directory)
    command = [*rsh, *port, dest, "safehold", "serve"]
    return RemoteBackend(url, command, path)
