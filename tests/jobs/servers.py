"""Real servers for alert tests: an SMTP server (aiosmtpd, optionally STARTTLS or implicit TLS
with a self-signed certificate, optionally AUTH), an HTTP server that records every request,
and a TCP port that accepts connections but never answers.

Use the context managers (``smtp_capture``, ``http_capture``, ``silent_port``) or the pytest
fixtures at the bottom (``smtp_server``, ``smtp_tls_server``, ``http_server``): wrap them in
a fixture of your own, or import them in a ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.tools import skip_or_fail


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed certificate for ``name`` and 127.0.0.1 and its key (PEM) into
    ``directory``; returns (cert path, key path)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# -- SMTP -------------------------------------------------------------------------------------


@dataclass
class ReceivedMail:
    """One message the SMTP server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool
    """Whether the session was encrypted (STARTTLS or implicit TLS) when the mail came in."""
    login: str | None
    """The user that authenticated the session, if any."""

    @property
    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg

    @property
    def subject(self) -> str:
        return str(self.message["Subject"] or "")

    def text(self) -> str:
        """The decoded text of every text part (transfer encodings undone)."""
        parts = []
        for part in self.message.walk():
            if part.get_content_maintype() == "text":
                parts.append(str(part.get_content()))
        return "\n".join(parts)


@dataclass
class SMTPCapture:
    """A running SMTP server. ``mails`` fills as messages arrive; ``auth_attempts`` lists
    (user, success) for every AUTH."""

    host: str
    port: int
    tls: str | None
    user: str | None
    password: str | None
    mails: list[ReceivedMail] = field(default_factory=list)
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)

    def url(self, to: str = "ops@example.com", sender: str = "safehold@example.com") -> str:
        """The apprise URL that delivers here: ``mailto://`` for plain SMTP, ``mailtos://``
        with ``mode=starttls``/``mode=ssl`` and ``verify=no`` (self-signed certificate) for
        TLS, with the user and password when AUTH is on."""
        cred = f"{self.user}:{self.password}@" if self.user else ""
        q = f"to={to}&from={sender}"
        if self.tls is None:
            return f"mailto://{cred}{self.host}:{self.port}?{q}&mode=insecure"
        return f"mailtos://{cred}{self.host}:{self.port}?{q}&mode={self.tls}&verify=no"

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[ReceivedMail]:
        """Wait until at least ``n`` mails arrived; returns them all."""
        _wait(lambda: len(self.mails) >= n, timeout, f"{n} mail(s)")
        return list(self.mails)


class _SMTPHandler:
    def __init__(self, cap: SMTPCapture) -> None:
        self.cap = cap

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        auth = getattr(session, "auth_data", None)
        login = getattr(auth, "login", None)
        transport = getattr(server, "transport", None)
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        self.cap.mails.append(
            ReceivedMail(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                raw=bytes(envelope.original_content or envelope.content),
                tls=session.ssl is not None or ssl_object is not None,
                login=login.decode() if isinstance(login, bytes) else login,
            )
        )
        return "250 Message accepted for delivery"


@contextlib.contextmanager
def smtp_capture(
    *,
    tls: str | None = None,
    user: str | None = None,
    password: str | None = None,
    cert_dir: Path | None = None,
) -> Iterator[SMTPCapture]:
    """Run an aiosmtpd server on 127.0.0.1 for the ``with`` block.

    ``tls``: None (plain SMTP), ``"starttls"`` (STARTTLS required before MAIL and AUTH) or
    ``"ssl"`` (implicit TLS); both use a self-signed certificate written to ``cert_dir`` (a
    temporary directory if not given). ``user``/``password``: require AUTH (PLAIN or LOGIN)
    with these credentials; a wrong one is refused (535)."""
    try:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword
    except ImportError:
        skip_or_fail("aiosmtpd is not installed (pip install -e .[test])")
        raise
    if tls not in (None, "starttls", "ssl"):
        raise ValueError(f"tls={tls!r}")
    cap = SMTPCapture("127.0.0.1", free_port(), tls, user, password)
    kwargs: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if tls is not None:
            import tempfile

            d = cert_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            cert, key = self_signed_cert(d)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            if tls == "starttls":
                kwargs.update(tls_context=ctx, require_starttls=True)
            else:
                kwargs.update(ssl_context=ctx)
        if user is not None:

            def authenticator(
                server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
            ) -> Any:
                ok = (
                    isinstance(auth_data, LoginPassword)
                    and auth_data.login.decode() == user
                    and auth_data.password.decode() == (password or "")
                )
                login = getattr(auth_data, "login", b"")
                cap.auth_attempts.append((login.decode(errors="replace"), ok))
                return AuthResult(success=ok, auth_data=auth_data if ok else None)

            kwargs.update(
                authenticator=authenticator,
                auth_required=True,
                # aiosmtpd only knows STARTTLS sessions as encrypted: with implicit TLS it would
                # not offer AUTH at all
                auth_require_tls=tls == "starttls",
            )
        controller = Controller(_SMTPHandler(cap), hostname=cap.host, port=cap.port, **kwargs)
        controller.start()
        try:
            yield cap
        finally:
            controller.stop()


# -- HTTP -------------------------------------------------------------------------------------


@dataclass
class CapturedRequest:
    method: str
    path: str
    """The request target as sent (path and query)."""
    headers: dict[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class HTTPCapture:
    """A running HTTP server that records every request (any method) and answers with the
    status set for its path (``respond``; 200 by default), after ``delay_s`` seconds."""

    def __init__(self) -> None:
        self.requests: list[CapturedRequest] = []
        self.statuses: dict[str, int] = {}
        self.default_status = 200
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def json_url(self, path: str = "/hook") -> str:
        """The apprise webhook URL posting JSON here: ``json://127.0.0.1:PORT/hook``."""
        return f"json://127.0.0.1:{self.port}{path}"

    def respond(self, path: str, status: int) -> None:
        """Answer requests for ``path`` (without query) with ``status``."""
        self.statuses[path] = status

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[CapturedRequest]:
        _wait(lambda: len(self.requests) >= n, timeout, f"{n} HTTP request(s)")
        with self._lock:
            return list(self.requests)

    def _record(self, req: CapturedRequest) -> int:
        with self._lock:
            self.requests.append(req)
        return self.statuses.get(req.path.split("?", 1)[0], self.default_status)


def _handler_for(cap: HTTPCapture) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status = cap._record(
                CapturedRequest(self.command, self.path, dict(self.headers.items()), body)
            )
            if cap.delay_s:
                time.sleep(cap.delay_s)
            reply = b"OK" if status < 400 else b"error"
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting (timeout tests)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def http_capture() -> Iterator[HTTPCapture]:
    """Run an :class:`HTTPCapture` on 127.0.0.1 (a free port) for the ``with`` block."""
    cap = HTTPCapture()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(cap))
    server.daemon_threads = True
    cap.server = server
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="http-capture", daemon=True
    )
    thread.start()
    try:
        yield cap
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts TCP connections (the kernel completes the handshake)
    but never says a word: a hung server, for timeout tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


# -- pytest fixtures --------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[SMTPCapture]:
    """Plain SMTP, no AUTH."""
    with smtp_capture() as s:
        yield s


@pytest.fixture
def smtp_tls_server(tmp_path: Path) -> Iterator[SMTPCapture]:
    """STARTTLS required, AUTH as ``alice`` / ``s3cr3t-pw``."""
    with smtp_capture(
        tls="starttls", user="alice", password="s3cr3t-pw", cert_dir=tmp_path / "tls"
    ) as s:
        yield s


@pytest.fixture
def http_server() -> Iterator[HTTPCapture]:
    with http_capture() as h:
        yield h
