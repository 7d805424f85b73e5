"""Progress and event records that operations report through callbacks. Nothing here prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Event:
    """Something an operation tells its caller: ``kind`` names it, ``data`` carries the details.

    Kinds used today: ``progress`` (files/bytes done and total), ``warning`` (a file could not be
    read, vanished or changed; the message names it), ``info`` (a one-line note for the user),
    ``file`` (one entry processed, for verbose listings), ``damage`` (check found a problem).
    """

    kind: str
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[Event], None]


def ignore_events(_event: Event) -> None:
    """An event sink that drops everything."""
