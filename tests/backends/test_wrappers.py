"""RetryingBackend, FaultInjectingBackend and CountingBackend (and how each passes
clean_temporaries on)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from safehold.backends import (
    Backend,
    CountingBackend,
    FaultInjectingBackend,
    LocalBackend,
    MemoryBackend,
    ObjectInfo,
    RetryingBackend,
)
from safehold.backends.base import CleansTemporaries, clean_temporaries
from safehold.backends.wrappers import KillingBackend
from safehold.errors import AlreadyExists, NotFound, PermanentError, TransientError


class Sleeps:
    """A fake ``sleep`` that records the pauses asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture(params=["memory", "local"])
def inner(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    backend = LocalBackend(tmp_path / "repo")
    backend.create()
    return backend


def retrying(inner: Backend, **kwargs: object) -> tuple[RetryingBackend, Sleeps]:
    sleeps = Sleeps()
    return RetryingBackend(inner, sleep=sleeps, **kwargs), sleeps  # type: ignore[arg-type]


# --- RetryingBackend -----------------------------------------------------------------------------


def test_store_timeout_then_same_content_counts_as_success(inner: Backend) -> None:
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("store", kind="timeout")
    backend, sleeps = retrying(faulty)
    backend.store("data/ab/x", b"payload")
    assert inner.load("data/ab/x") == b"payload"
    stats = faulty.stats
    assert stats["store"] == 2  # the lost answer, then the retry that met the same content
    assert stats["store.timeout"] == 1
    assert len(sleeps.delays) == 1


def test_store_against_different_content_is_not_retried(inner: Backend) -> None:
    inner.store("data/ab/x", b"original")
    faulty = FaultInjectingBackend(inner, seed=1)
    backend, sleeps = retrying(faulty)
    with pytest.raises(AlreadyExists):
        backend.store("data/ab/x", b"changed")
    assert faulty.stats["store"] == 1
    assert sleeps.delays == []
    assert inner.load("data/ab/x") == b"original"


def test_store_after_truncated_write_is_retried(inner: Backend) -> None:
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("store", count=2, kind="truncated_write")
    backend, _ = retrying(faulty)
    backend.store("data/ab/x", b"payload")
    assert inner.load("data/ab/x") == b"payload"
    assert faulty.stats["store"] == 3


def test_short_reads_are_retried(inner: Backend) -> None:
    data = os.urandom(10_000)
    inner.store("data/p", data)
    faulty = FaultInjectingBackend(inner, seed=3)
    faulty.fail_next("load", count=2, kind="short_read")
    backend, sleeps = retrying(faulty)
    assert backend.load("data/p", 1000, 5000) == data[1000:6000]
    assert faulty.stats["load"] == 3
    assert faulty.stats["load.short_read"] == 2
    assert len(sleeps.delays) == 2


def test_read_clipped_at_the_end_is_not_a_short_read(inner: Backend) -> None:
    inner.store("data/p", b"0123456789")
    faulty = FaultInjectingBackend(inner, seed=3)
    backend, sleeps = retrying(faulty)
    assert backend.load("data/p", 6, 100) == b"6789"
    assert backend.load("data/p", 10, 100) == b""
    assert backend.load("data/p", 50, 1) == b""
    assert faulty.stats["load"] == 3
    assert sleeps.delays == []


class ShortReader:
    """Always answers loads with one byte too few (a backend with a bug, or a bad proxy)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(name, offset, length)[:-1]


def test_persistent_short_reads_fail_after_the_attempts(inner: Backend) -> None:
    inner.store("data/p", b"0123456789")
    backend, sleeps = retrying(ShortReader(inner), attempts=3)  # type: ignore[arg-type]
    with pytest.raises(TransientError, match=r"^load data/p failed after 3 attempts: short read"):
        backend.load("data/p", 0, 10)
    assert len(sleeps.delays) == 2


def test_partial_listing_is_retried_from_scratch(inner: Backend) -> None:
    names = {f"data/{i % 16:02x}/{i:04d}" for i in range(100)}
    for name in names:
        inner.store(name, b"x")
    faulty = FaultInjectingBackend(inner, seed=5)
    faulty.fail_next("list", count=2, kind="timeout")
    backend, _ = retrying(faulty)
    assert sorted(info.name for info in backend.list("data/")) == sorted(names)
    assert faulty.stats["list"] == 3


def test_partial_listing_with_permanent_faults_raises_and_hands_out_nothing(
    inner: Backend,
) -> None:
    for i in range(50):
        inner.store(f"data/{i:04d}", b"x")
    faulty = FaultInjectingBackend(
        inner, seed=5, rate=1.0, kinds=frozenset({"timeout"}), permanent=True
    )
    # Without the retrying layer, the faulty listing does hand out part of the entries first:
    seen: list[ObjectInfo] = []
    with pytest.raises(PermanentError):
        for info in faulty.list("data/"):
            seen.append(info)
    assert 0 <= len(seen) <= 50
    # Through it, the consumer gets the error and not a single entry.
    backend, sleeps = retrying(faulty)
    got: list[ObjectInfo] = []
    with pytest.raises(PermanentError):
        for info in backend.list("data/"):
            got.append(info)
    assert got == []
    assert sleeps.delays == []


class PartialLister:
    """A listing that hands out ``good`` entries and then fails, ``failures`` times."""

    def __init__(self, inner: Backend, failures: int, good: int) -> None:
        self.inner = inner
        self.failures = failures
        self.good = good
        self.calls = 0

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls += 1
        failing = self.calls <= self.failures
        for i, info in enumerate(self.inner.list(prefix)):
            if failing and i == self.good:
                raise TransientError("connection reset while listing")
            yield info


def test_listing_that_always_fails_part_way_raises_after_the_attempts(inner: Backend) -> None:
    for i in range(20):
        inner.store(f"data/{i:04d}", b"x")
    lister = PartialLister(inner, failures=100, good=10)
    backend, _ = retrying(lister, attempts=4)  # type: ignore[arg-type]
    got: list[ObjectInfo] = []
    with pytest.raises(TransientError, match=r"^list data/ failed after 4 attempts: connection"):
        for info in backend.list("data/"):
            got.append(info)
    assert got == []
    assert lister.calls == 4
    lister.failures = 5  # fails once more, then succeeds
    assert len(list(backend.list("data/"))) == 20


def test_permanent_error_is_not_retried(inner: Backend) -> None:
    inner.store("data/x", b"x")
    faulty = FaultInjectingBackend(inner, seed=1, permanent=True)
    retries: list[tuple[str, str, BaseException, int]] = []
    backend, sleeps = retrying(faulty, on_retry=lambda *a: retries.append(a))
    calls: list[tuple[str, Callable[[], object]]] = [
        ("load", lambda: backend.load("data/x")),
        ("stat", lambda: backend.stat("data/x")),
        ("store", lambda: backend.store("data/y", b"y")),
        ("delete", lambda: backend.delete("data/x")),
        ("list", lambda: list(backend.list(""))),
    ]
    for op, call in calls:
        faulty.fail_next(op)
        with pytest.raises(PermanentError, match="injected permanent error"):
            call()
        assert faulty.stats[op] == 1, op
    assert sleeps.delays == []
    assert retries == []


def test_not_found_and_already_exists_are_not_retried(inner: Backend) -> None:
    inner.store("data/x", b"x")
    faulty = FaultInjectingBackend(inner, seed=1)
    backend, sleeps = retrying(faulty)
    with pytest.raises(NotFound):
        backend.load("data/missing")
    with pytest.raises(NotFound):
        backend.stat("data/missing")
    with pytest.raises(NotFound):
        backend.delete("data/missing")
    with pytest.raises(AlreadyExists):
        backend.store("data/x", b"y")
    assert sleeps.delays == []
    stats = faulty.stats
    assert (stats["load"], stats["stat"], stats["delete"], stats["store"]) == (1, 1, 1, 1)


def test_bounded_attempts_reraise_with_the_count_and_cause(inner: Backend) -> None:
    inner.store("data/x", b"x")
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("stat", count=100)
    retries: list[tuple[str, str, BaseException, int]] = []
    backend, sleeps = retrying(
        faulty,
        attempts=6,
        base_delay=0.1,
        max_delay=0.5,
        on_retry=lambda *a: retries.append(a),
    )
    with pytest.raises(TransientError) as info:
        backend.stat("data/x")
    message = str(info.value)
    assert message == "stat data/x failed after 6 attempts: injected error in stat data/x"
    assert isinstance(info.value.__cause__, TransientError)
    assert faulty.stats["stat"] == 6
    assert [(op, name, attempt) for op, name, _, attempt in retries] == [
        ("stat", "data/x", n) for n in range(1, 6)
    ]
    assert all(isinstance(error, TransientError) for _, _, error, _ in retries)
    # exponential backoff with jitter: 0.1, 0.2, 0.4, 0.5, 0.5, each in [half, full]
    assert len(sleeps.delays) == 5
    for delay, full in zip(sleeps.delays, [0.1, 0.2, 0.4, 0.5, 0.5]):
        assert full / 2 <= delay <= full
    # the next call starts afresh and succeeds once the faults are used up
    faulty.clear_rules()
    assert backend.stat("data/x").size == 1


def test_one_attempt_means_no_retry(inner: Backend) -> None:
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("load")
    backend, sleeps = retrying(faulty, attempts=1)
    with pytest.raises(TransientError, match="failed after 1 attempts"):
        backend.load("data/x")
    assert sleeps.delays == []
    with pytest.raises(ValueError):
        RetryingBackend(inner, attempts=0)


def test_delete_whose_answer_was_lost_counts_as_done(inner: Backend) -> None:
    inner.store("data/x", b"x")
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("delete", kind="timeout")
    backend, _ = retrying(faulty)
    backend.delete("data/x")  # the retry meets NotFound: the lost attempt deleted it
    with pytest.raises(NotFound):
        inner.stat("data/x")
    assert faulty.stats["delete"] == 2
    with pytest.raises(NotFound):  # without a failed attempt first, NotFound stands
        backend.delete("data/x")


def test_retry_passes_location_create_and_close_through(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "new" / "repo")
    backend = RetryingBackend(local, sleep=Sleeps())
    assert backend.location == local.location
    backend.create()
    assert (tmp_path / "new" / "repo").is_dir()
    backend.close()


def test_retrying_real_sleep_is_short_with_small_delays(inner: Backend) -> None:
    faulty = FaultInjectingBackend(inner, seed=1)
    faulty.fail_next("store", count=3)
    backend = RetryingBackend(faulty, base_delay=0.001, max_delay=0.002)
    backend.store("data/x", b"x")
    assert inner.load("data/x") == b"x"


# --- FaultInjectingBackend -----------------------------------------------------------------------


def fault_trace(seed: int, rate: float, calls: int = 300) -> list[str]:
    """What happens to ``calls`` mixed calls under faults: 'ok' or the error's type."""
    memory = MemoryBackend()
    memory.store("data/x", b"0123456789")
    faulty = FaultInjectingBackend(memory, seed=seed, rate=rate)
    trace = []
    for i in range(calls):
        try:
            if i % 3 == 0:
                result = repr(faulty.load("data/x", 0, 10))
            elif i % 3 == 1:
                result = repr(faulty.stat("data/x"))
            else:
                faulty.store(f"data/{i}", b"y")
                result = "stored"
        except TransientError as e:
            result = str(e)
        trace.append(result)
    return trace


def test_faults_are_deterministic_for_a_seed() -> None:
    first = fault_trace(seed=42, rate=0.3)
    assert fault_trace(seed=42, rate=0.3) == first
    assert fault_trace(seed=43, rate=0.3) != first
    injected = sum("injected" in r or "b'0123456789'" not in r for r in first[::3])
    assert 15 <= injected <= 50  # about 30 of the 100 loads fail or come back short


def test_rate_zero_injects_nothing_and_rate_one_always(inner: Backend) -> None:
    inner.store("data/x", b"x")
    faulty = FaultInjectingBackend(inner, seed=7)
    for _ in range(200):
        assert faulty.load("data/x") == b"x"
    assert faulty.injected == 0
    faulty.rate = 1.0
    for _ in range(50):
        with pytest.raises(TransientError):
            faulty.stat("data/x")
    assert faulty.injected == 50
    with pytest.raises(ValueError):
        faulty.rate = 1.5


def test_ops_and_kinds_filters(inner: Backend) -> None:
    inner.store("data/x", b"0123456789")
    faulty = FaultInjectingBackend(
        inner, seed=7, rate=1.0, ops=frozenset({"stat"}), kinds=frozenset({"short_read"})
    )
    # stat is chosen but no enabled kind applies to it; load is not chosen at all
    assert faulty.stat("data/x").size == 10
    assert faulty.load("data/x", 0, 10) == b"0123456789"
    assert faulty.injected == 0
    faulty = FaultInjectingBackend(inner, seed=7, rate=1.0, kinds=frozenset({"short_read"}))
    for _ in range(20):
        short = faulty.load("data/x", 2, 8)
        assert b"23456789".startswith(short)
        assert len(short) < 8
    # a whole-object load gets no random short read: nothing could tell it was short
    assert faulty.load("data/x") == b"0123456789"
    with pytest.raises(ValueError):
        FaultInjectingBackend(inner, seed=1, kinds=frozenset({"meteor"}))
    with pytest.raises(ValueError):
        FaultInjectingBackend(inner, seed=1, ops=frozenset({"copy"}))


def test_timeout_on_store_stores_and_truncated_write_does_not(inner: Backend) -> None:
    faulty = FaultInjectingBackend(inner, seed=7)
    faulty.fail_next("store", kind="timeout")
    with pytest.raises(TransientError, match="injected timeout"):
        faulty.store("data/a", b"a")
    assert inner.load("data/a") == b"a"
    faulty.fail_next("store", kind="truncated_write")
    with pytest.raises(TransientError, match="injected truncated_write"):
        faulty.store("data/b", b"b")
    with pytest.raises(NotFound):
        inner.stat("data/b")
    faulty.fail_next("store", kind="error")
    with pytest.raises(TransientError, match="injected error"):
        faulty.store("data/c", b"c")
    with pytest.raises(NotFound):
        inner.stat("data/c")
    faulty.fail_next("delete", kind="timeout")
    with pytest.raises(TransientError):
        faulty.delete("data/a")
    with pytest.raises(NotFound):
        inner.stat("data/a")


def test_errors_of_the_inner_backend_pass_through_a_timeout(inner: Backend) -> None:
    inner.store("data/a", b"a")
    faulty = FaultInjectingBackend(inner, seed=7)
    faulty.fail_next("load", kind="timeout")
    with pytest.raises(NotFound):
        faulty.load("data/missing")
    faulty.fail_next("store", kind="timeout")
    with pytest.raises(AlreadyExists):
        faulty.store("data/a", b"b")


def test_fail_next_matches_names_and_counts(inner: Backend) -> None:
    inner.store("data/a", b"a")
    inner.store("index/i", b"i")
    faulty = FaultInjectingBackend(inner, seed=7)
    faulty.fail_next("load", count=2, match="index/")
    assert faulty.load("data/a") == b"a"  # no match: no fault
    for _ in range(2):
        with pytest.raises(TransientError):
            faulty.load("index/i")
    assert faulty.load("index/i") == b"i"  # used up
    assert faulty.stats == {"load": 4, "load.error": 2}
    for op, kind in [("store", "short_read"), ("load", "truncated_write"), ("list", "short_read")]:
        with pytest.raises(ValueError):
            faulty.fail_next(op, kind=kind)
    with pytest.raises(ValueError):
        faulty.fail_next("copy")
    with pytest.raises(ValueError):
        faulty.fail_next("load", count=0)


def test_permanent_faults(inner: Backend) -> None:
    inner.store("data/a", b"a")
    faulty = FaultInjectingBackend(inner, seed=7, permanent=True)
    faulty.fail_next("stat", kind="timeout")
    with pytest.raises(PermanentError, match="injected permanent timeout in stat data/a"):
        faulty.stat("data/a")


def test_fault_injection_is_thread_safe(inner: Backend) -> None:
    inner.store("data/a", b"a")
    faulty = FaultInjectingBackend(inner, seed=9, rate=0.5, kinds=frozenset({"error"}))
    failures = [0] * 8

    def work(t: int) -> None:
        for _ in range(250):
            try:
                faulty.stat("data/a")
            except TransientError:
                failures[t] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = faulty.stats
    assert stats["stat"] == 2000
    assert stats["stat.error"] == sum(failures) == faulty.injected
    assert 800 <= sum(failures) <= 1200


def test_retrying_stack_survives_every_kind_of_fault(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "repo")
    local.create()
    faulty = FaultInjectingBackend(local, seed=11, rate=0.3)
    backend = RetryingBackend(faulty, attempts=30, sleep=Sleeps())
    blobs = {f"data/{i % 8:02x}/{i:03d}": os.urandom(100 + i) for i in range(120)}
    for name, data in blobs.items():
        backend.store(name, data)
    for _ in range(3):
        assert {i.name: i.size for i in backend.list("data/")} == {
            n: len(d) for n, d in blobs.items()
        }
    for name, data in blobs.items():
        assert backend.load(name) == data
        assert backend.load(name, 50, 60) == data[50:110]
        assert backend.stat(name).size == len(data)
    for name in list(blobs)[:40]:
        backend.delete(name)
    assert len(list(backend.list("data/"))) == 80
    stats = faulty.stats
    for key in ["store.error", "store.timeout", "store.truncated_write", "load.error"]:
        assert stats[key] > 0, key
    for key in ["load.timeout", "load.short_read", "stat.error", "delete.timeout"]:
        assert stats[key] > 0, key
    assert stats["list.error"] + stats["list.timeout"] > 0
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "repo").rglob("*"))


# --- CountingBackend -----------------------------------------------------------------------------


def test_counting_backend(inner: Backend) -> None:
    counting = CountingBackend(inner)
    counting.create()
    counting.store("data/ab/p", b"x" * 100)
    counting.store("data/ab/q", memoryview(b"y" * 50))
    counting.store("config", b"c")
    counting.store("data/ab/p", b"x" * 100)  # same content again: counted as a store
    with pytest.raises(AlreadyExists):
        counting.store("config", b"d")  # failed: a call, but no bytes
    assert counting.load("data/ab/p", 10, 20) == b"x" * 20
    assert len(list(counting.list("data/"))) == 2
    counting.stat("config")
    counting.delete("config")
    with pytest.raises(NotFound):
        counting.load("config")
    assert counting.calls == {
        "create": 1,
        "store": 5,
        "load": 2,
        "list": 1,
        "stat": 1,
        "delete": 1,
    }
    assert counting.bytes == {"store": 251, "load": 20}
    assert counting.stored_objects == {"data": 3, "": 1}
    assert counting.stored_bytes == {"data": 250, "": 1}
    assert counting.location == inner.location
    counting.reset()
    assert counting.calls == {} and counting.bytes == {}


def test_counting_backend_is_thread_safe() -> None:
    counting = CountingBackend(MemoryBackend())

    def work(t: int) -> None:
        for j in range(200):
            counting.store(f"data/{t}/{j}", b"12345")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counting.calls["store"] == 1600
    assert counting.bytes["store"] == 8000


# --- clean_temporaries through the wrappers ------------------------------------------------------

HOUR = 3600.0


def plant_old_temporary(root: Path, name: str) -> None:
    path = root.joinpath(*name.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half written")
    when = time.time() - 2 * HOUR
    os.utime(path, (when, when))


class FlakyCleaner(MemoryBackend):
    """A backend whose clean_temporaries fails ``failures`` times, then removes ``names``."""

    def __init__(self, failures: int, error: Exception, names: list[str]) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.names = names
        self.calls: list[float] = []

    def clean_temporaries(self, older_than_s: float) -> list[str]:
        self.calls.append(older_than_s)
        if len(self.calls) <= self.failures:
            raise self.error
        return list(self.names)


def wrapper_stacks(inner: Backend) -> dict[str, Backend]:
    return {
        "retrying": RetryingBackend(inner, sleep=Sleeps()),
        "faulty": FaultInjectingBackend(inner, seed=3, rate=1.0),
        "counting": CountingBackend(inner),
        "killing": KillingBackend(inner, after=1000),
        "all": RetryingBackend(
            FaultInjectingBackend(CountingBackend(KillingBackend(inner, after=1000)), seed=4),
            sleep=Sleeps(),
        ),
    }


def test_wrappers_pass_clean_temporaries_on(tmp_path: Path) -> None:
    for label in ("retrying", "faulty", "counting", "killing", "all"):
        local = LocalBackend(tmp_path / label)
        local.create()
        wrapper = wrapper_stacks(local)[label]
        local.store("data/ab/object", b"object")
        plant_old_temporary(tmp_path / label, "data/ab/.tmp-0123456789abcdef")
        assert isinstance(wrapper, CleansTemporaries), label
        assert clean_temporaries(wrapper, HOUR) == ["data/ab/.tmp-0123456789abcdef"], label
        assert wrapper.clean_temporaries(HOUR) == [], label
        assert [i.name for i in local.list("")] == ["data/ab/object"], label
        if isinstance(wrapper, KillingBackend):
            assert wrapper._writes == 0  # removing temporaries is no write


def test_wrappers_of_a_backend_without_temporaries_return_nothing() -> None:
    memory = MemoryBackend()
    assert not isinstance(memory, CleansTemporaries)
    assert clean_temporaries(memory, 0) == []
    for label, wrapper in wrapper_stacks(memory).items():
        assert clean_temporaries(wrapper, 0) == [], label
    with pytest.raises(ValueError):
        clean_temporaries(memory, -1)


def test_retrying_clean_temporaries() -> None:
    flaky = FlakyCleaner(2, TransientError("listing cut off"), ["data/.tmp-1"])
    backend, sleeps = retrying(flaky)
    assert clean_temporaries(backend, HOUR) == ["data/.tmp-1"]
    assert flaky.calls == [HOUR] * 3
    assert len(sleeps.delays) == 2
    # a permanent error is not retried
    flaky = FlakyCleaner(1, PermanentError("permission denied"), [])
    backend, sleeps = retrying(flaky)
    with pytest.raises(PermanentError):
        clean_temporaries(backend, HOUR)
    assert flaky.calls == [HOUR] and sleeps.delays == []
    # nor are more attempts made than allowed
    flaky = FlakyCleaner(10, TransientError("down"), [])
    backend, sleeps = retrying(flaky, attempts=3)
    with pytest.raises(TransientError, match="clean_temporaries failed after 3 attempts: down"):
        clean_temporaries(backend, HOUR)


def test_counting_and_fault_injection_of_clean_temporaries() -> None:
    flaky = FlakyCleaner(0, TransientError("unused"), ["a/.tmp-1", ".tmp-2"])
    counting = CountingBackend(flaky)
    assert clean_temporaries(counting, 5) == ["a/.tmp-1", ".tmp-2"]
    assert counting.calls == {"clean_temporaries": 1}
    faulty = FaultInjectingBackend(flaky, seed=1, rate=1.0)
    assert clean_temporaries(faulty, 6) == ["a/.tmp-1", ".tmp-2"]  # no faults injected into it
    assert faulty.injected == 0
    assert flaky.calls == [5, 6]
