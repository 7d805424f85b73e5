"""Time, as the repository protocol sees it: a wall clock, a clock that keeps counting while the
machine is suspended, and timers. Tests and the schedule explorer pass a virtual clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class Clock:
    """Real time. ``time()`` is the wall clock (seconds since the epoch, what other clients read
    in lock objects); ``elapsed()`` never goes back and, unlike ``time.monotonic()``, keeps
    counting while the machine sleeps (Linux ``CLOCK_BOOTTIME``)."""

    def time(self) -> float:
        return time.time()

    def elapsed(self) -> float:
        if _BOOTTIME is not None:
            return time.clock_gettime(_BOOTTIME)
        return time.monotonic()  # pragma: no cover - not Linux

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def every(self, fn: Callable[[], float], first: float) -> Callable[[], None]:
        """Call ``fn`` after ``first`` seconds, then again after as many seconds as it returns,
        in a daemon thread, until the returned stop function is called."""
        stop = threading.Event()

        def loop() -> None:
            delay = first
            while not stop.wait(delay):
                delay = fn()

        thread = threading.Thread(target=loop, daemon=True, name="safehold-timer")
        thread.start()

        def cancel() -> None:
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=5)

        return cancel


REAL_CLOCK = Clock()
