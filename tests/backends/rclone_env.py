"""The fixture ``rclone_env``: the real rclone binary, driven through a temporary config file.

Nothing is mocked: the backend under test starts the real ``rclone rcd``. The remote is of
rclone's ``local`` type, defined in a config file made per test, so the developer's own rclone
configuration is never read (``RCLONE_CONFIG`` points at the test's file for this process and,
through :attr:`RcloneEnv.env`, for subprocesses). Helpers are in ``tests/support/rclone_config.py``.

A test module that uses the fixture names this module in its ``pytest_plugins``; the tests are
skipped, with the reason, only where the rclone binary is not installed (CI installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.rclone_config import NO_RCLONE, RCLONE, REMOTE, RcloneEnv, write_config
from tests.support.tools import skip_or_fail


@pytest.fixture
def rclone_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RcloneEnv:
    """A config file with the local remote ``safehold-test``, set as ``RCLONE_CONFIG``.

    Skips the test if rclone is not installed. Any ``RCLONE_*`` setting of the developer's
    environment is removed, so the tests see rclone's defaults.
    """
    if RCLONE is None:
        skip_or_fail(NO_RCLONE)
    for key in list(os.environ):
        if key.startswith("RCLONE_"):
            monkeypatch.delenv(key)
    base = tmp_path / "remote"
    base.mkdir()
    config = write_config(tmp_path / "rclone.conf", {REMOTE: {"type": "local"}})
    monkeypatch.setenv("RCLONE_CONFIG", str(config))
    return RcloneEnv(config, base)
