"""Walking a snapshot's trees without recursion and with bounded work.

A snapshot's trees form a DAG: a tree id may be referenced from many places (identical
directories share one tree). A hostile repository can use that to make a tiny snapshot expand to
billions of paths (each level referencing the next twice, 30 levels deep: 2^30 paths from 30
trees). Every walk here is iterative (an explicit stack: a 10,000-level tree walks like a flat
one) and bounded: it refuses with :class:`IntegrityError` once it meets more entries than the
snapshot recorded (:func:`entry_limit`), or than :data:`NO_SUMMARY_LIMIT` when it recorded none.
:func:`tree_totals` computes a tree's expanded size once per distinct tree id, so it finds such a
DAG after reading only its distinct trees.

The recorded counts are written by whoever holds the key, so they bound nothing against a
hostile writer (up to :data:`HARD_LIMIT`). The bound a snapshot cannot forge is its expansion
relative to its *distinct* entries (the entries of its distinct trees, each counted once): more
than :data:`EXPANSION_FACTOR` paths per distinct entry plus :data:`EXPANSION_SLACK` is refused
(:func:`check_expansion`). A walk allowed more than :data:`EXPANSION_SLACK` entries sizes its
tree first (:func:`tree_totals`, reading each distinct tree once), before it yields anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from safehold.errors import FormatError, IntegrityError, SafeholdError
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, salvage_tree
from safehold.repository.repo import Repository

Parts = tuple[bytes, ...]
TreeIds = tuple[bytes, ...]
ErrorHandler = Callable[[Parts, SafeholdError], None]
"""Called with the path of a directory whose tree cannot be read (its contents are skipped),
or of an entry that is invalid (a field outside its bounds, an invalid or duplicate name: the
entry is skipped, the other entries of its tree are not)."""

UNNAMED = b"<an entry without a valid name>"
"""The name an invalid entry is reported under when its name cannot be read."""

NO_SUMMARY_LIMIT = 50_000_000
"""Entries a snapshot that records no counts may expand to."""
HARD_LIMIT = 1 << 30
"""Entries no snapshot may expand to, whatever its summary claims (a summary is written with the
repository's key: a thief of that key could claim any count)."""
SLACK = 10_000
"""Entries a walk may meet beyond twice the recorded counts (the directories above the backed-up
paths, counters of older versions)."""
EXPANSION_FACTOR = 10_000
EXPANSION_SLACK = 1_000_000
"""A tree may expand to at most ``EXPANSION_FACTOR`` x its distinct entries + ``EXPANSION_SLACK``
paths (docs/format.md §10). Identical directories share one tree, so k copies of a folder of m
entries expand to about k*m paths from m + k distinct entries: a ratio above 10,000 needs more
than 10,000 copies of a folder of more than 10,000 entries (10^8 paths). A walk bounded by at
most ``EXPANSION_SLACK`` entries cannot break the bound, and is not sized first."""

_COUNT_KEYS = ("files_new", "files_changed", "files_unmodified", "dirs", "other_entries")


def expands_error(limit: int) -> IntegrityError:
    return IntegrityError(
        "the snapshot's trees expand beyond what it recorded "
        f"(more than {limit:,} entries): damaged or hostile"
    )


def entry_limit(snapshot: Snapshot | None) -> int:
    """How many entries a walk of ``snapshot`` may meet before it is called damaged or hostile:
    twice the entries its summary recorded plus :data:`SLACK`, or :data:`NO_SUMMARY_LIMIT` when
    the summary holds no counts."""
    summary = snapshot.summary if snapshot is not None else {}
    vals = [summary.get(k) for k in _COUNT_KEYS]
    if not all(type(v) is int and v >= 0 for v in vals):
        return NO_SUMMARY_LIMIT
    recorded = sum(v for v in vals if isinstance(v, int))
    return min(2 * recorded + SLACK, HARD_LIMIT)


def records_counts(snapshot: Snapshot | None) -> bool:
    """Whether the snapshot's summary records how many entries it holds."""
    return entry_limit(snapshot) != NO_SUMMARY_LIMIT


def expansion_bound(distinct: int) -> int:
    """The most paths a tree whose distinct trees hold ``distinct`` entries may expand to."""
    return EXPANSION_FACTOR * distinct + EXPANSION_SLACK


def amplified_error(entries: int, distinct: int) -> IntegrityError:
    return IntegrityError(
        f"the snapshot's trees expand to {entries:,} entries from only {distinct:,} distinct "
        f"entries (at most {EXPANSION_FACTOR:,} per distinct entry + {EXPANSION_SLACK:,}): "
        "damaged or hostile"
    )


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise IntegrityError(f"refusing unsafe name {name!r} in the snapshot")


def walk_tree(
    repo: Repository,
    tree_id: bytes,
    *,
    prefix: Parts = (),
    limit: int | None = None,
    on_error: ErrorHandler | None = None,
    descend: Callable[[Parts, Node], bool] | None = None,
    check_names: bool = False,
) -> Iterator[tuple[Parts, Node]]:
    """Every entry below ``tree_id`` with its path (``prefix`` + names), pre-order, in each
    tree's order, without recursion.

    A directory's tree is read after the directory is yielded, and only if ``descend`` (when
    given) says so. A tree that cannot be read raises, or with ``on_error`` is reported by the
    directory's path and skipped. ``check_names``: unsafe names (``/``, ``.``, ``..``, NUL,
    empty) and a name met twice in one tree are errors (raised, or reported and skipped).
    Raises :class:`IntegrityError` once more than ``limit`` entries (default
    :data:`NO_SUMMARY_LIMIT`) were met. A walk allowed more than :data:`EXPANSION_SLACK` entries
    first sizes the tree (:func:`tree_totals`: each distinct tree read once) and raises, before
    yielding anything, if it expands beyond ``limit`` or :func:`expansion_bound`."""
    cap = NO_SUMMARY_LIMIT if limit is None else limit
    if cap > EXPANSION_SLACK and tree_id not in _sized.get(repo, ()):
        tree_totals(repo, tree_id, limit=cap, on_error=_ignore)
    count = 0
    # each frame: the directory's path and its remaining entries (reversed: pop from the end)
    stack: list[tuple[Parts, list[Node]]] = []
    first = _read(repo, tree_id, prefix, on_error)
    if first is not None:
        stack.append((prefix, first[::-1]))
    seen: list[set[bytes]] = [set()]
    while stack:
        parts, nodes = stack[-1]
        if not nodes:
            stack.pop()
            seen.pop()
            continue
        node = nodes.pop()
        path = (*parts, node.name)
        if check_names:
            try:
                check_name(node.name)
                if node.name in seen[-1]:
                    raise IntegrityError(f"duplicate name {node.name!r} in a snapshot tree")
            except IntegrityError as e:
                if on_error is None:
                    raise
                on_error(path, e)
                continue
            seen[-1].add(node.name)
        count += 1
        if count > cap:
            raise expands_error(cap)
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            if descend is not None and not descend(path, node):
                continue
            children = _read(repo, node.subtree, path, on_error)
            if children is not None:
                stack.append((path, children[::-1]))
                seen.append(set())


def _ignore(parts: Parts, err: SafeholdError) -> None:
    """Sizing skips what it cannot read: the walk that follows reports it."""


def _read(
    repo: Repository, tree_id: bytes, parts: Parts, on_error: ErrorHandler | None
) -> list[Node] | None:
    try:
        return repo.read_tree(tree_id)
    except SafeholdError as e:
        if on_error is None:
            raise
        if isinstance(e, FormatError):
            # a tree that decrypts but holds invalid entries: only those are lost
            got = _salvage(repo, tree_id, parts, on_error)
            if got is not None:
                return got
        on_error(parts, e)
        return None


def _salvage(
    repo: Repository, tree_id: bytes, parts: Parts, on_error: ErrorHandler
) -> list[Node] | None:
    """The valid entries of a tree whose invalid entries are each reported by their path; None
    if the tree as a whole cannot be read."""
    try:
        nodes, bad = salvage_tree(repo.read_blob(tree_id))
    except SafeholdError:
        return None
    if not bad:
        return None  # not an entry's fault: the tree's own error stands
    for name, err in bad:
        on_error((*parts, name or UNNAMED), err)
    return nodes


@dataclass(frozen=True, slots=True)
class TreeTotals:
    """What a tree holds, every path counted (a shared subtree once per place it appears)."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    bytes: int = 0  # the sizes of its files
    own: int = 0  # the entries of this tree itself
    children: TreeIds = ()  # the distinct subtree ids of its entries


_EMPTY = TreeTotals()

_sized: weakref.WeakKeyDictionary[Repository, set[bytes]] = weakref.WeakKeyDictionary()
"""Per repository, the trees :func:`tree_totals` found within the expansion bound: a walk of
them need not size them again."""


def distinct_entries(memo: dict[bytes, TreeTotals], tree_id: bytes) -> int:
    """The entries of the distinct trees below (and of) ``tree_id``, each tree counted once,
    from a ``memo`` filled by :func:`tree_totals` (no tree is read)."""
    seen = {tree_id}
    stack = [tree_id]
    total = 0
    while stack:
        t = memo.get(stack.pop(), _EMPTY)
        total += t.own
        for c in t.children:
            if c not in seen:
                seen.add(c)
                stack.append(c)
    return total


def check_expansion(entries: int, distinct: Callable[[], int]) -> None:
    """Raise :class:`IntegrityError` if ``entries`` paths exceed :func:`expansion_bound` of the
    distinct entries (computed only when ``entries`` exceeds :data:`EXPANSION_SLACK`)."""
    if entries <= EXPANSION_SLACK:
        return
    d = distinct()
    if entries > expansion_bound(d):
        raise amplified_error(entries, d)


def tree_totals(
    repo: Repository,
    tree_id: bytes,
    *,
    limit: int | None = None,
    memo: dict[bytes, TreeTotals] | None = None,
    on_error: ErrorHandler | None = None,
) -> TreeTotals:
    """The expanded size of a tree, reading each distinct tree once (``memo``, tree id ->
    totals, may be shared between calls: a tree's totals depend only on its id). Iterative.

    Raises :class:`IntegrityError` as soon as a tree expands to more than ``limit`` entries
    (default :data:`NO_SUMMARY_LIMIT`), when it expands to more than :func:`expansion_bound` of
    its distinct entries, or when a tree contains itself. A tree that cannot be read
    raises, or with ``on_error`` is reported (by the path where it was first met) and counts as
    empty."""
    cap = NO_SUMMARY_LIMIT if limit is None else limit
    memo = {} if memo is None else memo
    active: set[bytes] = set()
    # frames: (tree id, its path, its nodes once read)
    stack: list[tuple[bytes, Parts, list[Node] | None]] = [(tree_id, (), None)]
    while stack:
        tid, parts, nodes = stack[-1]
        if nodes is None:
            if tid in memo:
                stack.pop()
                continue
            if tid in active:
                raise IntegrityError("a snapshot tree contains itself: damaged or hostile")
            read = _read(repo, tid, parts, on_error)
            if read is None:
                memo[tid] = _EMPTY
                stack.pop()
                continue
            active.add(tid)
            stack[-1] = (tid, parts, read)
            for n in read:
                if n.type == "dir" and n.subtree is not None and n.subtree not in memo:
                    stack.append((n.subtree, (*parts, n.name), None))
            continue
        entries = files = dirs = size = 0
        children: dict[bytes, None] = {}
        for n in nodes:
            entries += 1
            if n.type == "file":
                files += 1
                size += n.size
            elif n.type == "dir":
                dirs += 1
                if n.subtree is not None:
                    children[n.subtree] = None
                    sub = memo.get(n.subtree, _EMPTY)
                    entries += sub.entries
                    files += sub.files
                    dirs += sub.dirs
                    size += sub.bytes
        if entries > cap:
            raise expands_error(cap)
        memo[tid] = TreeTotals(entries, files, dirs, size, len(nodes), tuple(children))
        active.discard(tid)
        stack.pop()
    total = memo[tree_id]
    if total.entries > cap:
        raise expands_error(cap)
    check_expansion(total.entries, lambda: distinct_entries(memo, tree_id))
    _sized.setdefault(repo, set()).add(tree_id)
    return total


def snapshot_totals(
    repo: Repository,
    snapshot: Snapshot,
    *,
    memo: dict[bytes, TreeTotals] | None = None,
    on_error: ErrorHandler | None = None,
) -> TreeTotals:
    """:func:`tree_totals` of a snapshot's root tree, bounded by :func:`entry_limit`."""
    return tree_totals(
        repo, snapshot.tree, limit=entry_limit(snapshot), memo=memo, on_error=on_error
    )


T = TypeVar("T")


def run_nested(walk: Generator[Any, Any, T]) -> T:
    """Run a recursive walk with an explicit stack: a walk yields the walk of a subtree, is sent
    that walk's result (or has its exception thrown in), and returns its own result. A tree's
    depth then costs heap, never Python's recursion limit."""
    stack: list[Generator[Any, Any, Any]] = [walk]
    value: Any = None
    error: BaseException | None = None
    while True:
        top = stack[-1]
        try:
            sub = top.send(value) if error is None else top.throw(error)
        except StopIteration as done:
            stack.pop()
            if not stack:
                result: T = done.value
                return result
            value, error = done.value, None
            continue
        except BaseException as e:
            stack.pop()
            if not stack:
                raise
            value, error = None, e
            continue
        stack.append(sub)
        value, error = None, None
