"""Storage backends: where a repository's objects live, and wrappers that add behaviour."""

from safehold.backends.base import Backend, ObjectInfo
from safehold.backends.local import LocalBackend
from safehold.backends.memory import MemoryBackend
from safehold.backends.registry import open_backend, register_scheme
from safehold.backends.wrappers import CountingBackend, FaultInjectingBackend, RetryingBackend

__all__ = [
    "Backend",
    "CountingBackend",
    "FaultInjectingBackend",
    "LocalBackend",
    "MemoryBackend",
    "ObjectInfo",
    "RetryingBackend",
    "open_backend",
    "register_scheme",
]
