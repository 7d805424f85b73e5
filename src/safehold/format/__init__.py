"""On-disk structures of repository format v1: serialize and parse only (no crypto, no I/O).

docs/format.md is the byte-level specification; every change here changes it too.
"""

from safehold.format.common import FORMAT_VERSION

__all__ = ["FORMAT_VERSION"]
