"""Parsing of sizes (``512K``, ``10M``, ``1.5G``, binary units) and durations (``1y2m3d4h``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from safehold.errors import UsageError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512K"`` → 524288. Binary units; a bare number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r} (expected e.g. 512K, 10M, 1.5G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """A human-readable binary size: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_WAIT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_wait(text: str) -> float:
    """A wait in seconds: ``30s``, ``5m`` (minutes), ``2h``; a bare number is seconds."""
    m = _WAIT_RE.match(text)
    if not m:
        raise UsageError(f"invalid wait {text!r} (expected e.g. 30s, 5m or 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(frozen=True, slots=True)
class Duration:
    """A calendar duration as restic writes it: years, months, days, hours."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0


_DUR_RE = re.compile(r"(\d+)([ymdh])")


def parse_duration(text: str) -> Duration:
    """``"1y2m3d4h"`` → Duration(1, 2, 3, 4)."""
    s = text.strip()
    parts = _DUR_RE.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise UsageError(f"invalid duration {text!r} (expected e.g. 1y2m3d4h)")
    values = {"y": 0, "m": 0, "d": 0, "h": 0}
    for num, unit in parts:
        values[unit] += int(num)
    return Duration(values["y"], values["m"], values["d"], values["h"])
