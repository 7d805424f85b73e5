"""Backends that wrap another backend: retrying, fault injection (for tests) and counting.

Each also passes ``clean_temporaries`` (see :func:`safehold.backends.base.clean_temporaries`)
on to the backend it wraps: it returns ``[]`` when that one has none.
"""

from __future__ import annotations

import builtins
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from safehold.backends.base import Backend, ObjectInfo, clean_temporaries
from safehold.errors import NotFound, PermanentError, TransientError

T = TypeVar("T")

OPS: frozenset[str] = frozenset({"list", "load", "store", "delete", "stat"})
"""The operations a fault can be injected into."""

FAULT_KINDS: frozenset[str] = frozenset({"error", "timeout", "short_read", "truncated_write"})
"""The kinds of fault :class:`FaultInjectingBackend` can inject."""

_KIND_OPS: dict[str, frozenset[str]] = {
    "error": OPS,
    "timeout": OPS,
    "short_read": frozenset({"load"}),
    "truncated_write": frozenset({"store"}),
}

SleepFn = Callable[[float], None]
RetryHook = Callable[[str, str, BaseException, int], None]


# --- retrying ------------------------------------------------------------------------------------


class RetryingBackend:
    """Retries :class:`~safehold.errors.TransientError` with exponential backoff and jitter.

    Every call is retried up to ``attempts`` times in all; NotFound, AlreadyExists and
    PermanentError are passed on at once. After the last attempt the TransientError is raised
    again as ``"<op> <name> failed after N attempts: <cause>"``.

    - ``list`` reads the whole listing inside the retry, so a listing that fails part-way is
      read again from the start and never handed out partial.
    - ``load`` with a ``length`` treats a result shorter than the object allows (checked with
      ``stat``) as a transient short read and retries it.
    - ``store`` relies on the inner backend's create-if-absent check: an attempt whose answer
      was lost but which did store makes the retry meet the same content, which succeeds.
    - ``delete`` whose earlier attempt failed transiently and whose retry finds nothing counts
      as done: the lost attempt may well have deleted it.

    ``on_retry(op, name, error, attempt)`` is called before each pause; ``attempt`` counts
    from 1 and is the attempt that failed.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 6,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        sleep: SleepFn = time.sleep,
        on_retry: RetryHook | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        if base_delay < 0 or max_delay < 0:
            raise ValueError("delays must not be negative")
        self.inner = inner
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._sleep = sleep
        self._on_retry = on_retry
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"RetryingBackend({self.inner!r})"

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number ``attempt`` (from 1): half fixed, half random."""
        full = min(self._max_delay, self._base_delay * 2.0 ** min(attempt - 1, 60))
        return full / 2 + self._random.uniform(0, full / 2)

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return fn()
            except TransientError as e:
                if attempt >= self._attempts:
                    target = f"{op} {name}" if name else op
                    raise TransientError(f"{target} failed after {attempt} attempts: {e}") from e
                if self._on_retry is not None:
                    self._on_retry(op, name, e, attempt)
                self._sleep(self.delay(attempt))
                attempt += 1

    @property
    def location(self) -> str:
        return self.inner.location

    def create(self) -> None:
        self._call("create", self.inner.location, self.inner.create)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        def read_all() -> builtins.list[ObjectInfo]:
            return builtins.list(self.inner.list(prefix))

        return iter(self._call("list", prefix, read_all))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        def attempt() -> bytes:
            data = self.inner.load(name, offset, length)
            if length is not None and len(data) < length:
                size = self.inner.stat(name).size
                expected = max(0, min(length, size - offset))
                if len(data) < expected:
                    raise TransientError(
                        f"short read of {name}: got {len(data)} of {expected} bytes "
                        f"at offset {offset}"
                    )
            return data

        return self._call("load", name, attempt)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self._call("store", name, lambda: self.inner.store(name, data, overwrite=overwrite))

    def delete(self, name: str) -> None:
        failed_before = False

        def attempt() -> None:
            nonlocal failed_before
            try:
                self.inner.delete(name)
            except TransientError:
                failed_before = True
                raise
            except NotFound:
                if not failed_before:
                    raise

        self._call("delete", name, attempt)

    def stat(self, name: str) -> ObjectInfo:
        return self._call("stat", name, lambda: self.inner.stat(name))

    def close(self) -> None:
        self.inner.close()

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """The inner backend's, retried like the other calls (a temporary an attempt that
        failed part-way removed is not in the names returned)."""
        return self._call(
            "clean_temporaries", "", lambda: clean_temporaries(self.inner, older_than_s)
        )


# --- fault injection -----------------------------------------------------------------------------


@dataclass
class _Rule:
    op: str
    kind: str
    match: str
    remaining: int


class FaultInjectingBackend:
    """Injects faults into calls of an inner backend (after Kopia's blobtesting/faulty.go).

    A ``random.Random(seed)`` decides per call whether to inject a fault (probability ``rate``)
    into an operation named in ``ops``, of one of the enabled ``kinds`` that applies to it:

    - ``"error"``: raise TransientError before calling the inner backend.
    - ``"timeout"``: call the inner backend, then raise TransientError as if the answer was lost
      (a store has stored, a delete has deleted; a listing hands out part of its entries first).
    - ``"short_read"``: a load (with a ``length``) returns a truncated prefix of the real result.
    - ``"truncated_write"``: a store stores nothing and raises TransientError (an atomic backend
      whose upload was cut off).

    An error the inner backend raises itself (NotFound, say) is passed on unchanged.
    ``permanent=True`` raises PermanentError instead of TransientError. Rules set with
    :meth:`fail_next` come first and apply whatever ``rate`` and ``ops`` say. ``stats`` counts
    calls per op (key ``op``) and injected faults (key ``"op.kind"``). Thread-safe.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        seed: int,
        rate: float = 0.0,
        kinds: frozenset[str] = FAULT_KINDS,
        ops: frozenset[str] = OPS,
        permanent: bool = False,
        sleep: SleepFn = time.sleep,
        timeout_delay: float = 0.0,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, not {rate}")
        if unknown := set(kinds) - FAULT_KINDS:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        if unknown := set(ops) - OPS:
            raise ValueError(f"unknown operations: {', '.join(sorted(unknown))}")
        self.inner = inner
        self.seed = seed
        self._rate = rate
        self._kinds = frozenset(kinds)
        self._ops = frozenset(ops)
        self._permanent = permanent
        self._sleep = sleep
        self._timeout_delay = timeout_delay
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: builtins.list[_Rule] = []
        self._stats: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"FaultInjectingBackend({self.inner!r}, seed={self.seed}, rate={self._rate})"

    # --- control -------------------------------------------------------------------------------

    def fail_next(self, op: str, count: int = 1, kind: str = "error", match: str = "") -> None:
        """Make the next ``count`` calls of ``op`` on a name starting with ``match`` fail."""
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r} (known: {', '.join(sorted(OPS))})")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if op not in _KIND_OPS[kind]:
            raise ValueError(f"a {kind!r} fault does not apply to {op!r}")
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        with self._lock:
            self._rules.append(_Rule(op, kind, match, count))

    def clear_rules(self) -> None:
        """Drop every rule set with :meth:`fail_next` that has not fired yet."""
        with self._lock:
            self._rules.clear()

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, not {value}")
        with self._lock:
            self._rate = value

    @property
    def stats(self) -> Counter[str]:
        """A copy of the counters: ``stats["load"]`` calls, ``stats["load.timeout"]`` faults."""
        with self._lock:
            return Counter(self._stats)

    @property
    def injected(self) -> int:
        """How many faults were injected in all."""
        with self._lock:
            return sum(n for key, n in self._stats.items() if "." in key)

    # --- machinery -----------------------------------------------------------------------------

    def _decide(self, op: str, name: str, has_length: bool = True) -> str | None:
        with self._lock:
            self._stats[op] += 1
            kind: str | None = None
            for rule in self._rules:
                if rule.op == op and name.startswith(rule.match):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    kind = rule.kind
                    break
            else:
                if op in self._ops and self._rate > 0 and self._random.random() < self._rate:
                    choices = sorted(
                        k
                        for k in self._kinds
                        if op in _KIND_OPS[k] and (k != "short_read" or has_length)
                    )
                    if choices:
                        kind = self._random.choice(choices)
            if kind is not None:
                self._stats[f"{op}.{kind}"] += 1
            return kind

    def _randrange(self, stop: int) -> int:
        with self._lock:
            return self._random.randrange(stop)

    def _fail(self, op: str, name: str, kind: str) -> Exception:
        target = f"{op} {name}" if name else op
        if self._permanent:
            return PermanentError(f"injected permanent {kind} in {target}")
        return TransientError(f"injected {kind} in {target}")

    def _lost_answer(self, op: str, name: str) -> Exception:
        if self._timeout_delay > 0:
            self._sleep(self._timeout_delay)
        return self._fail(op, name, "timeout")

    # --- the Backend protocol ------------------------------------------------------------------

    @property
    def location(self) -> str:
        return self.inner.location

    def create(self) -> None:
        self.inner.create()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        kind = self._decide("list", prefix)
        if kind == "error":
            raise self._fail("list", prefix, kind)
        if kind is None:
            return self.inner.list(prefix)
        entries = builtins.list(self.inner.list(prefix))
        return self._cut_listing(prefix, entries, self._randrange(len(entries) + 1))

    def _cut_listing(
        self, prefix: str, entries: builtins.list[ObjectInfo], keep: int
    ) -> Iterator[ObjectInfo]:
        yield from entries[:keep]
        raise self._lost_answer("list", prefix)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        kind = self._decide("load", name, has_length=length is not None)
        if kind == "error":
            raise self._fail("load", name, kind)
        data = self.inner.load(name, offset, length)
        if kind == "timeout":
            raise self._lost_answer("load", name)
        if kind == "short_read" and data:
            return data[: self._randrange(len(data))]
        return data

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        kind = self._decide("store", name)
        if kind in ("error", "truncated_write"):
            raise self._fail("store", name, kind)
        self.inner.store(name, data, overwrite=overwrite)
        if kind == "timeout":
            raise self._lost_answer("store", name)

    def delete(self, name: str) -> None:
        kind = self._decide("delete", name)
        if kind == "error":
            raise self._fail("delete", name, kind)
        self.inner.delete(name)
        if kind == "timeout":
            raise self._lost_answer("delete", name)

    def stat(self, name: str) -> ObjectInfo:
        kind = self._decide("stat", name)
        if kind == "error":
            raise self._fail("stat", name, kind)
        info = self.inner.stat(name)
        if kind == "timeout":
            raise self._lost_answer("stat", name)
        return info

    def close(self) -> None:
        self.inner.close()

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """Passed on to the inner backend (no faults are injected into it)."""
        return clean_temporaries(self.inner, older_than_s)


# --- counting ------------------------------------------------------------------------------------


def _folder(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else ""


class CountingBackend:
    """Counts calls per op and bytes stored and loaded; for tests and benchmarks. Thread-safe.

    ``calls[op]`` counts calls (successful or not) of ``list``, ``load``, ``store``, ``delete``,
    ``stat``, ``create``, ``clean_temporaries``; ``bytes["store"]`` and ``bytes["load"]`` count
    the bytes of successful stores and loads; ``stored_objects`` and ``stored_bytes`` break
    successful stores down by top-level folder (``"data"``, ``"index"``, … and ``""`` for names
    with no folder).
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self._stored_objects: Counter[str] = Counter()
        self._stored_bytes: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"CountingBackend({self.inner!r})"

    def _count(self, op: str) -> None:
        with self._lock:
            self._calls[op] += 1

    @property
    def calls(self) -> Counter[str]:
        with self._lock:
            return Counter(self._calls)

    @property
    def bytes(self) -> Counter[str]:
        with self._lock:
            return Counter(self._bytes)

    @property
    def stored_objects(self) -> Counter[str]:
        with self._lock:
            return Counter(self._stored_objects)

    @property
    def stored_bytes(self) -> Counter[str]:
        with self._lock:
            return Counter(self._stored_bytes)

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._calls.clear()
            self._bytes.clear()
            self._stored_objects.clear()
            self._stored_bytes.clear()

    @property
    def location(self) -> str:
        return self.inner.location

    def create(self) -> None:
        self._count("create")
        self.inner.create()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> builtins.bytes:
        self._count("load")
        data = self.inner.load(name, offset, length)
        with self._lock:
            self._bytes["load"] += len(data)
        return data

    def store(
        self, name: str, data: builtins.bytes | memoryview, *, overwrite: bool = False
    ) -> None:
        self._count("store")
        self.inner.store(name, data, overwrite=overwrite)
        size = memoryview(data).nbytes
        folder = _folder(name)
        with self._lock:
            self._bytes["store"] += size
            self._stored_objects[folder] += 1
            self._stored_bytes[folder] += size

    def delete(self, name: str) -> None:
        self._count("delete")
        self.inner.delete(name)

    def stat(self, name: str) -> ObjectInfo:
        self._count("stat")
        return self.inner.stat(name)

    def close(self) -> None:
        self.inner.close()

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        self._count("clean_temporaries")
        return clean_temporaries(self.inner, older_than_s)


class KillingBackend:
    """For crash tests: the process kills itself with SIGKILL right after its ``after``-th
    successful write (store or delete), as a power cut or ``kill -9`` would stop it.

    Enabled in the CLI by ``SAFEHOLD_TEST_KILL_AFTER_WRITES=N`` (see registry.open_backend)."""

    def __init__(self, inner: Backend, after: int) -> None:
        self._inner = inner
        self._after = after
        self._writes = 0
        self._lock = threading.Lock()

    def _wrote(self) -> None:
        with self._lock:
            self._writes += 1
            if self._writes >= self._after:
                os.kill(os.getpid(), signal.SIGKILL)

    @property
    def location(self) -> str:
        return self._inner.location

    def create(self) -> None:
        self._inner.create()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._inner.list(prefix)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._inner.load(name, offset, length)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self._inner.store(name, data, overwrite=overwrite)
        self._wrote()

    def delete(self, name: str) -> None:
        self._inner.delete(name)
        self._wrote()

    def stat(self, name: str) -> ObjectInfo:
        return self._inner.stat(name)

    def close(self) -> None:
        self._inner.close()

    def clean_temporaries(self, older_than_s: float) -> builtins.list[str]:
        """Passed on (removing temporaries does not count as a write)."""
        return clean_temporaries(self._inner, older_than_s)
