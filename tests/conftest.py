"""Shared fixtures: fast key derivation for tests, a CLI runner, generated trees."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.crypto import KdfParams
from safehold.repository.repo import InitOptions, Repository
from tests.support.treegen import make_tree

# Argon2id at its minimum for speed; the production defaults are tested in tests/unit.
FAST_KDF = "1,1024,1"
os.environ["SAFEHOLD_KDF"] = FAST_KDF
PASSWORD = "correct horse battery staple"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


class Cli:
    """Runs ``python -m safehold`` in a subprocess with an isolated environment."""

    def __init__(self, home: Path, repo: Path) -> None:
        self.repo = repo
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")} | {
            "SAFEHOLD_KDF": FAST_KDF,
            "SAFEHOLD_PASSWORD": PASSWORD,
            "SAFEHOLD_CACHE_DIR": str(home / "cache"),
            "SAFEHOLD_DATA_DIR": str(home / "data"),
            "SAFEHOLD_CONFIG_DIR": str(home / "config"),
            "HOME": str(home),
        }

    def __call__(
        self,
        *args: str,
        repo: bool = True,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        timeout: float = 300,
    ) -> Result:
        cmd = [sys.executable, "-m", "safehold"]
        if repo:
            cmd += ["--repo", str(self.repo)]
        proc = subprocess.run(
            cmd + list(args),
            env=self.env | (env or {}),
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return Result(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    def ok(self, *args: str, **kw: object) -> Result:
        r = self(*args, **kw)  # type: ignore[arg-type]
        assert r.code == 0, str(r)
        return r


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()
    return Cli(home, tmp_path / "repo")


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 3 MiB tree with every feature (read-only by convention: copy to change)."""
    root = tmp_path_factory.mktemp("tree") / "src"
    make_tree(root, 3 << 20, seed=7)
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = Repository.init(
        LocalBackend(tmp_path / "lib-repo"),
        PASSWORD.encode(),
        InitOptions(chunk_avg=64 << 10, pack_size=1 << 20, kdf=KdfParams(1, 1024, 1)),
        cache_dir=tmp_path / "lib-cache",
    )
    yield r
    r.close()
