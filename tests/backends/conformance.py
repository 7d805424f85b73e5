"""The conformance suite every backend must pass.

Use it by subclassing :class:`BackendConformance` in a test module that provides a ``backend``
fixture (an empty, created backend) and an ``on_disk`` fixture (an :class:`OnDisk` for the
folder of this machine where the backend keeps its files, for the backends that store through
temporary files and clean them up; None for the others); see ``test_conformance.py``. A new
backend (S3, SFTP, rclone, …) only adds a parameter to those fixtures.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from safehold.backends.base import Backend, ObjectInfo, clean_temporaries
from safehold.errors import AlreadyExists, NotFound, TransientError

BAD_NAMES = [
    "",
    "/abs",
    "/",
    "..",
    ".",
    "../escape",
    "a/../b",
    "a/..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "a\0b",
    "a\nb",
]

BAD_PREFIXES = ["/", "/data/", "../", "a/../", "a//", "..", "a\\b", "a\0"]

DAY = 24 * 3600.0


@dataclass(frozen=True)
class OnDisk:
    """The folder of this machine where a backend under test keeps its objects as files (its
    own, an SFTP server's, an rclone remote's): what an interrupted store leaves there."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    def set_age(self, name: str, age_s: float) -> None:
        """Set the modification (and access) time of file ``name`` to ``age_s`` seconds ago."""
        when = time.time() - age_s
        os.utime(self.path(name), (when, when))

    def plant_temporary(self, name: str, age_s: float) -> None:
        """Leave a temporary as a store cut short by a crash does (``name`` ends in
        ``.tmp-…``), last modified ``age_s`` seconds ago."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written " + os.urandom(100))
        self.set_age(name, age_s)

    def files(self) -> set[str]:
        """Every file under the root, as names relative to it."""
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}


def listing(backend: Backend, prefix: str) -> dict[str, int]:
    """The listing as name → size, checking that no name comes twice."""
    infos = list(backend.list(prefix))
    for info in infos:
        assert isinstance(info, ObjectInfo)
    names = [info.name for info in infos]
    assert len(names) == len(set(names)), "a listing named an object twice"
    return {info.name: info.size for info in infos}


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` for i in range(count) in threads started together; re-raise failures."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class BackendConformance:
    """Tests of the :class:`~safehold.backends.base.Backend` contract (needs ``backend``)."""

    # --- store and load ------------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
    def test_round_trip(self, backend: Backend, size: int) -> None:
        data = random.Random(size).randbytes(size)
        backend.store("data/ab/object", data)
        loaded = backend.load("data/ab/object")
        assert type(loaded) is bytes
        assert loaded == data
        assert backend.stat("data/ab/object") == ObjectInfo("data/ab/object", size)

    def test_top_level_and_nested_names(self, backend: Backend) -> None:
        objects = {
            "config": b"config",
            "keys/k1": b"key one",
            "data/00/p1": b"pack",
            "data/ff/deeper/still/p2": b"deep pack",
            "snapshots/s1": b"",
        }
        for name, data in objects.items():
            backend.store(name, data)
        for name, data in objects.items():
            assert backend.load(name) == data
        assert listing(backend, "") == {n: len(d) for n, d in objects.items()}
        assert listing(backend, "data/ff/") == {"data/ff/deeper/still/p2": 9}
        assert listing(backend, "keys/") == {"keys/k1": 7}

    def test_store_memoryview_is_copied_at_store_time(self, backend: Backend) -> None:
        buf = bytearray(b"abcdefgh" * 100)
        backend.store("data/mv", memoryview(buf)[8:])
        buf[8:16] = b"XXXXXXXX"
        assert backend.load("data/mv") == b"abcdefgh" * 99

    def test_load_ranges(self, backend: Backend) -> None:
        data = bytes(range(256)) * 4
        backend.store("data/r", data)
        cases: list[tuple[int, int | None, bytes]] = [
            (0, None, data),
            (0, 0, b""),
            (0, 10, data[:10]),
            (100, 50, data[100:150]),
            (500, None, data[500:]),
            (1000, 24, data[1000:]),  # ends exactly at the end
            (1000, 100, data[1000:]),  # clipped at the end
            (0, 1024, data),
            (0, 5000, data),
            (1023, 1, data[1023:]),
            (1023, None, data[1023:]),
            (1024, None, b""),  # offset at the end
            (1024, 10, b""),
            (2000, 10, b""),  # offset past the end
            (2000, None, b""),
            (512, 0, b""),
        ]
        for offset, length, expected in cases:
            got = backend.load("data/r", offset, length)
            assert got == expected, f"load(offset={offset}, length={length})"

    def test_load_ranges_of_empty_object(self, backend: Backend) -> None:
        backend.store("data/empty", b"")
        assert backend.load("data/empty") == b""
        assert backend.load("data/empty", 0, 10) == b""
        assert backend.load("data/empty", 5, 10) == b""
        assert backend.load("data/empty", 0, 0) == b""

    def test_negative_range_rejected(self, backend: Backend) -> None:
        backend.store("data/r", b"12345")
        with pytest.raises(ValueError):
            backend.load("data/r", -1, 2)
        with pytest.raises(ValueError):
            backend.load("data/r", 0, -2)

    # --- missing objects -----------------------------------------------------------------------

    @pytest.mark.parametrize("name", ["config", "data/ab/none", "no/such/folder/x"])
    def test_missing_object_is_not_found(self, backend: Backend, name: str) -> None:
        backend.store("data/ab/other", b"x")
        for call in (
            lambda: backend.load(name),
            lambda: backend.load(name, 10, 5),
            lambda: backend.load(name, 0, 0),
            lambda: backend.stat(name),
            lambda: backend.delete(name),
        ):
            with pytest.raises(NotFound) as info:
                call()
            assert not isinstance(info.value, TransientError)
            assert name in str(info.value)
            assert "\n" not in str(info.value)

    def test_a_folder_is_not_an_object(self, backend: Backend) -> None:
        backend.store("data/ab/object", b"x")
        for folder in ("data", "data/ab"):
            with pytest.raises(NotFound):
                backend.stat(folder)
            with pytest.raises(NotFound):
                backend.load(folder)
            with pytest.raises(NotFound):
                backend.delete(folder)
        assert backend.load("data/ab/object") == b"x"

    # --- create-if-absent and overwrite --------------------------------------------------------

    def test_store_same_content_again_succeeds(self, backend: Backend) -> None:
        data = os.urandom(5000)
        backend.store("data/ab/x", data)
        backend.store("data/ab/x", data)
        backend.store("data/ab/x", memoryview(data))
        assert backend.load("data/ab/x") == data
        assert listing(backend, "data/") == {"data/ab/x": 5000}

    @pytest.mark.parametrize("other", [b"different", b"differenT", b"short", b"", b"x" * 20])
    def test_store_different_content_raises_already_exists(
        self, backend: Backend, other: bytes
    ) -> None:
        backend.store("data/ab/x", b"different"[:-1] + b"!")
        with pytest.raises(AlreadyExists) as info:
            backend.store("data/ab/x", other)
        assert "data/ab/x" in str(info.value)
        assert backend.load("data/ab/x") == b"differen!"

    def test_empty_object_is_create_if_absent_too(self, backend: Backend) -> None:
        backend.store("locks/l", b"")
        backend.store("locks/l", b"")
        with pytest.raises(AlreadyExists):
            backend.store("locks/l", b"x")

    def test_overwrite_replaces(self, backend: Backend) -> None:
        backend.store("locks/l", b"first version", overwrite=True)  # absent: creates
        assert backend.load("locks/l") == b"first version"
        backend.store("locks/l", b"a much longer second version", overwrite=True)
        assert backend.load("locks/l") == b"a much longer second version"
        backend.store("locks/l", b"3rd", overwrite=True)
        assert backend.load("locks/l") == b"3rd"
        assert backend.stat("locks/l").size == 3
        assert listing(backend, "locks/") == {"locks/l": 3}

    # --- listing -------------------------------------------------------------------------------

    def test_list_more_than_a_thousand(self, backend: Backend) -> None:
        expected = {}
        for i in range(1100):
            name = f"data/{i % 256:02x}/{i:064x}"
            backend.store(name, b"z" * (i % 7))
            expected[name] = i % 7
        backend.store("index/i1", b"index")
        backend.store("config", b"c")
        assert listing(backend, "data/") == expected
        assert listing(backend, "") == {**expected, "index/i1": 5, "config": 1}
        assert listing(backend, "data/0a/") == {
            n: s for n, s in expected.items() if n.startswith("data/0a/")
        }
        assert len(listing(backend, "data/0a/")) == len(range(10, 1100, 256))

    def test_list_prefix_is_a_string_prefix(self, backend: Backend) -> None:
        names = ["data/ab/1", "data/ac/2", "data/b0/3", "database/4", "config"]
        for name in names:
            backend.store(name, b"x")
        assert set(listing(backend, "data/a")) == {"data/ab/1", "data/ac/2"}
        assert set(listing(backend, "data/ab/")) == {"data/ab/1"}
        assert set(listing(backend, "data/ab/1")) == {"data/ab/1"}
        assert set(listing(backend, "data")) == {
            "data/ab/1",
            "data/ac/2",
            "data/b0/3",
            "database/4",
        }
        assert set(listing(backend, "data/")) == {"data/ab/1", "data/ac/2", "data/b0/3"}
        assert set(listing(backend, "conf")) == {"config"}

    @pytest.mark.parametrize("prefix", ["snapshots/", "nope", "data/zz/", "config/", "a/b/c/"])
    def test_list_missing_prefix_is_empty(self, backend: Backend, prefix: str) -> None:
        backend.store("config", b"c")
        backend.store("data/ab/x", b"x")
        assert listing(backend, prefix) == {}

    def test_list_of_empty_backend_is_empty(self, backend: Backend) -> None:
        assert listing(backend, "") == {}
        assert listing(backend, "data/") == {}

    # --- delete --------------------------------------------------------------------------------

    def test_delete(self, backend: Backend) -> None:
        backend.store("data/ab/x", b"first")
        backend.store("data/ab/y", b"other")
        backend.delete("data/ab/x")
        with pytest.raises(NotFound):
            backend.stat("data/ab/x")
        with pytest.raises(NotFound):
            backend.load("data/ab/x")
        with pytest.raises(NotFound):
            backend.delete("data/ab/x")
        assert listing(backend, "data/") == {"data/ab/y": 5}
        backend.store("data/ab/x", b"new content")  # a deleted name is free again
        assert backend.load("data/ab/x") == b"new content"

    # --- concurrency ---------------------------------------------------------------------------

    def test_concurrent_stores_of_distinct_names(self, backend: Backend) -> None:
        def work(i: int) -> None:
            for j in range(25):
                backend.store(f"data/{j:02x}/t{i}-{j}", f"{i}:{j}".encode() * 50)

        run_threads(8, work)
        got = listing(backend, "data/")
        assert len(got) == 200
        for i in range(8):
            for j in range(25):
                data = f"{i}:{j}".encode() * 50
                assert got[f"data/{j:02x}/t{i}-{j}"] == len(data)
                assert backend.load(f"data/{j:02x}/t{i}-{j}") == data

    def test_concurrent_stores_of_one_name(self, backend: Backend) -> None:
        same = os.urandom(100_000)

        def store_same(i: int) -> None:
            backend.store("data/ab/same", same)

        run_threads(8, store_same)
        assert backend.load("data/ab/same") == same

        won: list[int] = []
        lost: list[int] = []

        def store_different(i: int) -> None:
            try:
                backend.store("data/ab/race", bytes([i]) * 100_000)
                won.append(i)
            except AlreadyExists:
                lost.append(i)

        run_threads(8, store_different)
        assert len(won) == 1, f"winners: {won}"
        assert sorted(won + lost) == list(range(8))
        assert backend.load("data/ab/race") == bytes([won[0]]) * 100_000
        assert listing(backend, "data/") == {"data/ab/same": 100_000, "data/ab/race": 100_000}

    # --- names ---------------------------------------------------------------------------------

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_bad_names_are_rejected(self, backend: Backend, name: str) -> None:
        backend.store("data/ab/ok", b"x")
        with pytest.raises(ValueError):
            backend.store(name, b"x")
        with pytest.raises(ValueError):
            backend.load(name)
        with pytest.raises(ValueError):
            backend.stat(name)
        with pytest.raises(ValueError):
            backend.delete(name)
        assert listing(backend, "") == {"data/ab/ok": 1}

    @pytest.mark.parametrize("prefix", BAD_PREFIXES)
    def test_bad_prefixes_are_rejected(self, backend: Backend, prefix: str) -> None:
        with pytest.raises(ValueError):
            list(backend.list(prefix))

    # --- temporaries of interrupted stores ----------------------------------------------------

    def test_clean_temporaries_removes_only_old_temporaries(
        self, backend: Backend, on_disk: OnDisk | None
    ) -> None:
        objects = {
            "config": b"config",
            "data/ab/object": b"pack",
            "data/ff/deeper/still/p2": b"deep pack",
            "data/.tmp-folder/object": b"a folder may start so, only a file name may not",
            "locks/l": b"lock",
        }
        for name, data in objects.items():
            backend.store(name, data)
        expected = {name: len(data) for name, data in objects.items()}
        old = [
            f".tmp-{0:016x}",
            f"data/ab/.tmp-{1:016x}",
            f"data/ab/.tmp-{2:016x}",
            f"data/cd/.tmp-{3:016x}",  # a folder with nothing else in it
            f"data/ff/deeper/still/.tmp-{4:016x}",
            f"locks/.tmp-{5:016x}",
        ]
        young = [f"data/ab/.tmp-{6:016x}", f"index/.tmp-{7:016x}"]
        if on_disk is None:
            # No temporaries (memory, S3) or no way to reach them (the ssh:// client).
            assert clean_temporaries(backend, DAY) == []
            assert clean_temporaries(backend, 0) == []
            assert listing(backend, "") == expected
            return
        for name in old:
            on_disk.plant_temporary(name, 2 * DAY)
        for name in young:
            on_disk.plant_temporary(name, 60)
        for name in objects:
            on_disk.set_age(name, 3 * DAY)  # older than every temporary: yet no temporary
        on_disk_before = on_disk.files()
        assert on_disk_before >= set(objects) | set(old) | set(young)
        # listings never show temporaries
        assert listing(backend, "") == expected
        assert listing(backend, "data/ab/") == {"data/ab/object": 4}
        assert listing(backend, "data/ab/.tmp-") == {}
        assert listing(backend, "data/cd/") == {}
        assert listing(backend, ".tmp") == {}

        removed = clean_temporaries(backend, DAY)
        assert sorted(removed) == sorted(old)
        assert on_disk.files() == on_disk_before - set(old)
        assert clean_temporaries(backend, DAY) == []  # nothing left that old

        # a limit of 30 seconds takes the temporaries of a minute ago, and still no object
        assert sorted(clean_temporaries(backend, 30)) == sorted(young)
        assert on_disk.files() == on_disk_before - set(old) - set(young)
        assert listing(backend, "") == expected
        for name, data in objects.items():
            assert backend.load(name) == data
        backend.store("data/ab/new", b"stores still work")
        assert backend.load("data/ab/new") == b"stores still work"

    @pytest.mark.parametrize("bad", [-1.0, -0.001, float("nan"), float("inf"), float("-inf")])
    def test_clean_temporaries_rejects_a_bad_age(self, backend: Backend, bad: float) -> None:
        backend.store("config", b"c")
        with pytest.raises(ValueError):
            clean_temporaries(backend, bad)
        assert backend.load("config") == b"c"

    # --- the rest ------------------------------------------------------------------------------

    def test_location_and_create_again(self, backend: Backend) -> None:
        assert isinstance(backend.location, str)
        assert backend.location
        backend.store("config", b"c")
        backend.create()  # harmless on a prepared location
        assert backend.load("config") == b"c"
