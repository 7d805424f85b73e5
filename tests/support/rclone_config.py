"""rclone for the tests: where the binary is, and temporary config files (no fixtures here).

The fixture ``rclone_env`` is in ``tests/backends/rclone_env.py`` (a plugin module, which test
modules name in ``pytest_plugins``); test modules import these helpers from here.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RCLONE = shutil.which("rclone")
NO_RCLONE = "the rclone binary is not installed (apt-get install rclone; CI installs it)"
requires_rclone = pytest.mark.skipif(RCLONE is None, reason=NO_RCLONE)

REMOTE = "safehold-test"
"""The name of the local-type remote every test config defines."""


def write_config(path: Path, remotes: dict[str, dict[str, str]]) -> Path:
    """An rclone config file defining ``remotes`` (name → settings)."""
    lines: list[str] = []
    for name, settings in remotes.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in settings.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RcloneEnv:
    """A temporary rclone config with the local-type remote :data:`REMOTE`."""

    config: Path
    base: Path
    """A folder for repositories: ``remote_path("x")`` is ``safehold-test:<base>/x``."""
    extra_env: dict[str, str] = field(default_factory=dict)

    def remote_path(self, sub: str) -> str:
        return f"{REMOTE}:{self.base / sub}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess that uses this config."""
        return {"RCLONE_CONFIG": str(self.config), **self.extra_env}
