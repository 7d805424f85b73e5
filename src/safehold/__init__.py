"""safehold: deduplicated, compressed, end-to-end encrypted, versioned backups.

The library is the product; the ``safehold`` command is a thin layer over it::

    from safehold import BackupOptions, Repository, RestoreOptions, backup, open_backend, restore

    repo = Repository.init(open_backend("/srv/backup"), b"a long passphrase")
    result = backup(repo, BackupOptions(paths=["/home/me/Documents"]))
    restore(repo, repo.find_snapshot("latest"), RestoreOptions(target="/tmp/restored"))

Operations report progress and warnings through an ``events`` callback and never print.
Unattended operation (the jobs file, runs, the daemon, history, alerts) is ``safehold.jobs``:
``load_config``, ``Runner``, ``Daemon``, ``History``.
"""

from safehold._version import __version__
from safehold.backends import Backend, LocalBackend, MemoryBackend, open_backend
from safehold.errors import SafeholdError
from safehold.events import Event
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node
from safehold.ops.backup import BackupOptions, BackupResult, backup
from safehold.ops.check import CheckOptions, CheckResult, check
from safehold.ops.copy import CopyOptions, CopyResult, copy_snapshots
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.mirror import MirrorOptions, MirrorResult, mirror
from safehold.ops.prune import PruneOptions, prune
from safehold.ops.restore import RestoreOptions, RestoreResult, iter_files, restore
from safehold.repository.repo import InitOptions, Repository, filter_snapshots

__all__ = [
    "Backend",
    "BackupOptions",
    "BackupResult",
    "CheckOptions",
    "CheckResult",
    "CopyOptions",
    "CopyResult",
    "Event",
    "ForgetOptions",
    "InitOptions",
    "LocalBackend",
    "MemoryBackend",
    "MirrorOptions",
    "MirrorResult",
    "Node",
    "PruneOptions",
    "Repository",
    "RestoreOptions",
    "RestoreResult",
    "SafeholdError",
    "Snapshot",
    "__version__",
    "backup",
    "check",
    "copy_snapshots",
    "filter_snapshots",
    "forget",
    "iter_files",
    "mirror",
    "open_backend",
    "plan_forget",
    "prune",
    "restore",
]
