"""The exception hierarchy of safehold and the exit code each maps to.

Every error a user can cause is a :class:`SafeholdError` with a one-line message; the CLI prints
``safehold: <message>`` and exits with :attr:`SafeholdError.exit_code`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_WARNINGS = 1
EXIT_ERROR = 2
EXIT_WRONG_PASSWORD = 3
EXIT_DAMAGE = 4
EXIT_LOCKED = 5
EXIT_INTERRUPTED = 130


class SafeholdError(Exception):
    """Base class: a failure with a clear one-line message."""

    exit_code = EXIT_ERROR


class UsageError(SafeholdError):
    """Invalid arguments or options."""


# --- storage -------------------------------------------------------------------------------------


class BackendError(SafeholdError):
    """A storage operation failed."""


class NotFound(BackendError):
    """The named object does not exist (a definite answer, not a transient failure)."""


class AlreadyExists(BackendError):
    """A create-if-absent store found an object of that name with different content."""


class TransientError(BackendError):
    """A failure worth retrying: a timeout, a dropped connection, a 5xx answer."""


class PermanentError(BackendError):
    """A failure that retrying will not fix: permission denied, full disk, bad credentials."""


class RepositoryNotFound(SafeholdError):
    """There is no repository at the given location."""


class RepositoryExists(SafeholdError):
    """init was asked to create a repository where one already exists."""


# --- keys and integrity --------------------------------------------------------------------------


class WrongPassword(SafeholdError):
    """No key file of the repository opens with the given password."""

    exit_code = EXIT_WRONG_PASSWORD


class IntegrityError(SafeholdError):
    """Stored data failed authentication or does not match its id (corrupt or tampered)."""

    exit_code = EXIT_DAMAGE


class FormatError(IntegrityError):
    """Stored data decrypted but is not a valid object of the expected kind."""


class UnsupportedVersion(SafeholdError):
    """The repository was written by a newer safehold with a format this version cannot read."""


class Locked(SafeholdError):
    """The repository is locked by another process."""

    exit_code = EXIT_LOCKED


class Interrupted(SafeholdError):
    """The operation was stopped by SIGINT or SIGTERM."""

    exit_code = EXIT_INTERRUPTED


class SnapshotNotFound(SafeholdError):
    """No snapshot matches the given id, prefix or ``latest`` with its filters."""


class AmbiguousSnapshot(SafeholdError):
    """A snapshot id prefix matches more than one snapshot."""
