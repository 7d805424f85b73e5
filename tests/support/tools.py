"""Tools and servers the tests need: with CI true a missing one fails the test, elsewhere (a
laptop without it) it skips."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def fail_in_ci(missing: str | None) -> None:
    """Fail the test when a tool it needs is missing (``missing`` says which) and ``CI`` is
    true: CI installs every tool, so there a missing one is an error, not a reason to skip."""
    if missing and in_ci():
        pytest.fail(f"{missing} (with CI={os.environ['CI']} a missing tool fails the test)")


def skip_or_fail(missing: str) -> None:
    """Skip the test for want of ``missing``, or fail it under CI."""
    fail_in_ci(missing)
    pytest.skip(missing)
