"""Small assertions and stand-ins shared by the tests."""

from __future__ import annotations


def stderr_line(err: str) -> str:
    """The one line a failing command printed (asserting there is exactly one, no traceback)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def error_line(e: BaseException) -> str:
    """An exception's message, asserting it is a single non-empty line."""
    text = str(e)
    assert text and "\n" not in text, repr(text)
    return text


def no_sleep(seconds: float) -> None:
    """A sleep for retry loops in tests: retry at once."""
