"""The options of backup, forget, prune and check, as one table each.

Every option has one name: ``exclude_larger_than`` in a jobs file and in the library is
``--exclude-larger-than`` on the command line. The CLI builds its arguments from these tables and
the jobs file is validated against them, so an option added here is settable everywhere.
Values come typed (TOML, Python) or as strings (command line); :func:`convert` takes both and
raises :class:`~safehold.errors.UsageError` with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from safehold.compress import Compression, CompressionRules
from safehold.errors import UsageError
from safehold.ops.backup import BackupOptions
from safehold.ops.check import CheckOptions, Subset
from safehold.ops.prune import PruneOptions, parse_max_unused
from safehold.policy import Policy
from safehold.units import parse_duration, parse_size

KINDS = (
    "bool", "int", "str", "list", "size", "duration", "subset", "percent", "minutes",
    "compression", "compression_for",
)  # fmt: skip
LIST_KINDS = ("list", "compression_for")


@dataclass(frozen=True)
class Opt:
    """One option: ``name`` in files and the library, ``--name-with-dashes`` on the CLI."""

    name: str
    kind: str  # one of KINDS
    help: str
    metavar: str | None = None
    short: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


BACKUP_OPTS: tuple[Opt, ...] = (
    Opt("exclude", "list", "leave out paths matching PATTERN (gitignore style)", "PATTERN", "-e"),
    Opt("exclude_file", "list", "read exclude patterns from FILE", "FILE"),
    Opt("exclude_caches", "bool", "leave out directories holding a CACHEDIR.TAG"),
    Opt("exclude_if_present", "list", "leave out directories holding a file NAME", "NAME"),
    Opt("exclude_larger_than", "size", "leave out files larger than SIZE", "SIZE"),
    Opt("one_file_system", "bool", "do not cross file system boundaries", None, "-x"),
    Opt("tag", "list", "tag the snapshot with TAG", "TAG"),
    Opt("host", "str", "record HOST as the snapshot's host", "HOST"),
    Opt("parent", "str", "compare with snapshot SNAP instead of the latest", "SNAP"),
    Opt(
        "compression",
        "compression",
        "auto, zstd[,LEVEL] or none (default: the repository's)",
        "SPEC",
    ),
    Opt(
        "compression_for", "compression_for", "compression for files matching GLOB", "GLOB=SETTING"
    ),
    Opt(
        "keep_deleted",
        "list",
        "carry files matching PATTERN that vanished from the source forward from the parent",
        "PATTERN",
    ),
)

RETENTION_OPTS: tuple[Opt, ...] = (
    Opt("keep_last", "int", "keep the last N snapshots", "N"),
    Opt("keep_hourly", "int", "keep the last snapshot of each of the last N hours", "N"),
    Opt("keep_daily", "int", "keep the last snapshot of each of the last N days", "N"),
    Opt("keep_weekly", "int", "keep the last snapshot of each of the last N weeks", "N"),
    Opt("keep_monthly", "int", "keep the last snapshot of each of the last N months", "N"),
    Opt("keep_yearly", "int", "keep the last snapshot of each of the last N years", "N"),
    Opt("keep_within", "duration", "keep snapshots this close to the newest (1y2m3d4h)", "DUR"),
    Opt("keep_tag", "list", "keep snapshots with TAG", "TAG"),
    Opt("group_by", "str", "group snapshots by host,paths,tags (default host,paths)", "LIST"),
    Opt("allow_empty", "bool", "allow a policy to remove every snapshot of a group"),
)

PRUNE_OPTS: tuple[Opt, ...] = (
    Opt("max_unused", "percent", "unused space left in partly used packs (default 5%)", "N%"),
    Opt("grace_minutes", "minutes", "also wait this long before deleting condemned packs", "M"),
)

CHECK_OPTS: tuple[Opt, ...] = (
    Opt("read_data", "bool", "read and verify every blob"),
    Opt("read_data_subset", "subset", "read a subset of the packs: N%, n/t or a size", "SUBSET"),
)


def by_name(opts: Sequence[Opt]) -> dict[str, Opt]:
    return {o.name: o for o in opts}


def convert(opt: Opt, value: Any) -> Any:
    """``value`` (typed, or a string from the command line) as the option's Python value."""
    k = opt.kind
    if k == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise UsageError(f"{value!r} is not true or false")
    if k == "int":
        if isinstance(value, bool):
            raise UsageError(f"{value!r} is not a whole number")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{value!r} is not a whole number") from None
        if n < 0:
            raise UsageError("must not be negative")
        return n
    if k == "str":
        if not isinstance(value, str):
            raise UsageError(f"{value!r} is not a string")
        return value
    if k in LIST_KINDS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise UsageError(f"{value!r} is not a list of strings")
        if k == "compression_for":
            CompressionRules.parse("auto", list(items))
        return list(items)
    if k == "compression":
        if not isinstance(value, str):
            raise UsageError(f"{value!r} is not a compression setting")
        Compression.parse(value)
        return value
    if k == "size":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str):
            return parse_size(value)
        raise UsageError(f"{value!r} is not a size (e.g. 512K, 10M, 1.5G)")
    if k == "duration":
        if isinstance(value, str):
            return parse_duration(value)
        raise UsageError(f"{value!r} is not a duration (e.g. 1y2m3d4h)")
    if k == "subset":
        if isinstance(value, str):
            Subset.parse(value)
            return value
        raise UsageError(f"{value!r} is not a subset (e.g. 10%, 2/5 or 500M)")
    if k == "percent":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{value}%"
        if isinstance(value, str):
            return parse_max_unused(value)
        raise UsageError(f"{value!r} is not a percentage (e.g. 5%)")
    if k == "minutes":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        if isinstance(value, str):
            try:
                m = float(value)
            except ValueError:
                m = -1.0
            if m >= 0:
                return m
        raise UsageError(f"{value!r} is not a number of minutes")
    raise AssertionError(f"unknown option kind {k}")


def _values(opts: Sequence[Opt], given: Mapping[str, Any], what: str) -> dict[str, Any]:
    table = by_name(opts)
    out: dict[str, Any] = {}
    for key, value in given.items():
        opt = table.get(key)
        if opt is None:
            raise UsageError(f"{key!r} is not a {what} option")
        try:
            out[key] = convert(opt, value)
        except UsageError as e:
            raise UsageError(f"{key}: {e}") from None
    return out


def backup_options(given: Mapping[str, Any], **extra: Any) -> BackupOptions:
    """BackupOptions from option names (``exclude``, ``tag``, ...) and their values; ``extra``
    sets BackupOptions fields directly (``paths``, ``dry_run``, ``stdin_filename``...)."""
    v = _values(BACKUP_OPTS, given, "backup")
    return BackupOptions(
        excludes=v.get("exclude", []),
        exclude_files=v.get("exclude_file", []),
        exclude_caches=v.get("exclude_caches", False),
        exclude_if_present=v.get("exclude_if_present", []),
        exclude_larger_than=v.get("exclude_larger_than"),
        one_file_system=v.get("one_file_system", False),
        tags=v.get("tag", []),
        host=v.get("host"),
        parent=v.get("parent"),
        compression=v.get("compression"),
        compression_for=v.get("compression_for", []),
        keep_deleted=v.get("keep_deleted", []),
        **extra,
    )


def retention_policy(given: Mapping[str, Any]) -> tuple[Policy, bool]:
    """The retention policy (and ``allow_empty``) from the forget options ``keep_last`` ...
    ``keep_within``, ``keep_tag``, ``group_by``, ``allow_empty``."""
    v = _values(RETENTION_OPTS, given, "retention")
    group_by = tuple(g.strip() for g in v.get("group_by", "host,paths").split(",") if g.strip())
    bad = [g for g in group_by if g not in ("host", "paths", "tags")]
    if bad:
        raise UsageError(f"group_by: cannot group by {bad[0]!r} (host, paths, tags)")
    policy = Policy(
        last=v.get("keep_last", 0),
        hourly=v.get("keep_hourly", 0),
        daily=v.get("keep_daily", 0),
        weekly=v.get("keep_weekly", 0),
        monthly=v.get("keep_monthly", 0),
        yearly=v.get("keep_yearly", 0),
        within=v.get("keep_within"),
        tags=tuple(v.get("keep_tag", [])),
        group_by=group_by,
    )
    return policy, bool(v.get("allow_empty", False))


def prune_options(given: Mapping[str, Any], *, dry_run: bool = False) -> PruneOptions:
    v = _values(PRUNE_OPTS, given, "prune")
    grace = v.get("grace_minutes")
    return PruneOptions(
        v.get("max_unused", parse_max_unused("5%")), dry_run, None if grace is None else grace * 60
    )


def check_options(given: Mapping[str, Any]) -> CheckOptions:
    v = _values(CHECK_OPTS, given, "check")
    return CheckOptions(read_data=v.get("read_data", False), subset=v.get("read_data_subset"))
