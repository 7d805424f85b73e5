"""Running a user's shell command (hooks, password commands, command alert targets).

Each runs through ``/bin/sh -c`` in a process group of its own, so that stopping it (a timeout,
SIGTERM) stops everything it started: the group gets SIGTERM, then SIGKILL. Output is kept
bounded (its last bytes), so a command that prints without end costs no memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

KILL_AFTER_S = 2.0
"""How long a stopped command's group has between SIGTERM and SIGKILL."""


@dataclass
class ShellResult:
    code: int | None  # None: stopped (timeout or stop event) before it ended
    out: bytes  # the last output_limit bytes of stdout (and stderr, when merged)
    err: bytes  # the last output_limit bytes of stderr, when not merged
    timed_out: bool = False

    def status(self) -> str:
        """``exited with status N`` / ``killed by signal N`` / ``timed out`` / ``was stopped``."""
        if self.code is None:
            return "timed out" if self.timed_out else "was stopped"
        if self.code < 0:
            return f"was killed by signal {-self.code}"
        return f"exited with status {self.code}"


def run_shell(
    cmd: str,
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stop: threading.Event | None = None,
    timeout_s: float | None = None,
    merge_stderr: bool = True,
    output_limit: int = 64 << 10,
) -> ShellResult:
    """Run ``cmd``; OSError if ``/bin/sh`` cannot be started."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", cmd],
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    bufs: list[bytearray] = []
    threads = []
    for stream in (proc.stdout, proc.stderr):
        if stream is None:
            bufs.append(bytearray())
            continue
        buf = bytearray()
        bufs.append(buf)
        threads.append(threading.Thread(target=_drain, args=(stream.fileno(), buf, output_limit)))
    if input is not None:
        threads.append(threading.Thread(target=_feed, args=(proc, input)))
    for t in threads:
        t.daemon = True
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    code: int | None = None
    timed_out = False
    while True:
        try:
            code = proc.wait(0.1)
            break
        except subprocess.TimeoutExpired:
            pass
        timed_out = deadline is not None and time.monotonic() > deadline
        if timed_out or (stop is not None and stop.is_set()):
            _kill_group(proc)
            code = None
            break
    for t in threads:
        t.join(5)
    return ShellResult(code, bytes(bufs[0]), bytes(bufs[1]), timed_out)


def _drain(fd: int, buf: bytearray, limit: int) -> None:
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            buf.extend(chunk)
            del buf[:-limit]


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(data)
    with contextlib.suppress(OSError):
        proc.stdin.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(KILL_AFTER_S)
            return
        except subprocess.TimeoutExpired:
            continue
