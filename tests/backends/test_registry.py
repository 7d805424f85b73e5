"""open_backend and register_scheme."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from safehold.backends import (
    Backend,
    LocalBackend,
    MemoryBackend,
    open_backend,
    register_scheme,
    registry,
)
from safehold.errors import UsageError


def test_plain_paths_open_a_local_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = open_backend(str(tmp_path / "repo"))
    assert isinstance(backend, LocalBackend)
    assert backend.location == str(tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    relative = open_backend("rel/repo")
    assert isinstance(relative, LocalBackend)
    assert relative.location == str(tmp_path / "rel" / "repo")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert open_backend("~/repo").location == str(tmp_path / "home" / "repo")


def test_file_urls(tmp_path: Path) -> None:
    backend = open_backend(f"file://{tmp_path}/my%20repo")
    assert isinstance(backend, LocalBackend)
    assert backend.location == str(tmp_path / "my repo")
    backend.create()
    backend.store("config", b"c")
    assert (tmp_path / "my repo" / "config").read_bytes() == b"c"
    assert open_backend(f"FILE://localhost{tmp_path}").location == str(tmp_path)
    for bad in ["file://otherhost/srv/repo", "file://relative/path", "file://", "file:///a?x=1"]:
        with pytest.raises(UsageError):
            open_backend(bad)


def test_memory_urls_share_a_backend_per_url() -> None:
    first = open_backend("memory://test-registry-shared")
    assert isinstance(first, MemoryBackend)
    assert first.location == "memory://test-registry-shared"
    first.store("config", b"c")
    again = open_backend("memory://test-registry-shared")
    assert again is first
    assert again.load("config") == b"c"
    other = open_backend("memory://test-registry-other")
    assert other is not first
    assert list(other.list("")) == []


def test_unknown_scheme_names_the_supported_ones() -> None:
    with pytest.raises(UsageError) as info:
        open_backend("ftp://host/path")
    assert str(info.value) == (
        "unsupported repository URL scheme 'ftp' in 'ftp://host/path' "
        "(supported: file, memory, rclone, s3, sftp, ssh)"
    )


def test_empty_location_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        open_backend("")


def test_register_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    opened: list[str] = []

    def factory(url: str) -> Backend:
        opened.append(url)
        return MemoryBackend("fake")

    register_scheme("fake", factory)
    backend = open_backend("Fake://host/path")
    assert isinstance(backend, MemoryBackend)
    assert opened == ["Fake://host/path"]
    with pytest.raises(
        UsageError, match=r"\(supported: fake, file, memory, rclone, s3, sftp, ssh\)"
    ):
        open_backend("ftp://host")
    with pytest.raises(UsageError, match=r"unknown option 'fake\.x' for fake:// repositories"):
        open_backend("fake://host/path", {"fake.x": "1"})
    with pytest.raises(ValueError):
        register_scheme("no spaces", factory)


def test_register_scheme_with_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    opened: list[tuple[str, dict[str, str]]] = []

    def factory(url: str, options: Mapping[str, str]) -> Backend:
        opened.append((url, dict(options)))
        return MemoryBackend("fake")

    register_scheme("fake", factory, options=["fake.a", "fake.b"])
    open_backend("fake://x")
    open_backend("fake://y", {"fake.b": "2"})
    assert opened == [("fake://x", {}), ("fake://y", {"fake.b": "2"})]
    with pytest.raises(
        UsageError, match=r"'fake.c' for fake:// repositories \(known: fake.a, fake"
    ):
        open_backend("fake://z", {"fake.c": "3"})
