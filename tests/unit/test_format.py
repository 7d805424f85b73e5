"""Serialization of the v1 structures: round trips, and refusal of malformed or newer data."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.errors import FormatError, UnsupportedVersion
from safehold.format.common import pack
from safehold.format.config import CONFIG_HEADER, CONFIG_MAGIC, split_config
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import PackEntry, header_from_bytes, header_to_bytes
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_from_bytes, tree_to_bytes

ids = st.binary(min_size=32, max_size=32)
names = st.binary(min_size=1, max_size=40)


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    typ = draw(st.sampled_from(["file", "dir", "symlink", "fifo"]))
    n = Node(
        name=draw(names),
        type=typ,
        mode=draw(
            st.sampled_from(
                [0, 0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000]
            )
        )
        | draw(st.integers(0, 0o7777)),
        uid=draw(st.integers(0, 2**32 - 1)),
        mtime_ns=draw(st.integers(-(2**62), 2**62)),
        size=draw(st.integers(0, 2**50)),
        ino=draw(st.integers(0, 2**64 - 1)),
        user=draw(st.text(max_size=10)),
    )
    if typ == "file":
        n.content = draw(st.lists(ids, max_size=5))
    if typ == "dir":
        n.subtree = draw(ids)
    if typ == "symlink":
        n.target = draw(st.binary(max_size=50))
    if draw(st.booleans()):
        n.xattrs = draw(st.dictionaries(names, st.binary(max_size=20), max_size=3)) or None
    return n


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=50)
@given(st.lists(nodes(), max_size=6, unique_by=lambda n: n.name))
def test_tree_roundtrip(ns: list[Node]) -> None:
    back = tree_from_bytes(tree_to_bytes(ns))
    assert back == sorted(ns, key=lambda n: n.name)


def test_tree_keeps_non_utf8_names() -> None:
    n = Node(name=b"caf\xe9.txt", type="file", content=[])
    assert tree_from_bytes(tree_to_bytes([n]))[0].name == b"caf\xe9.txt"


@pytest.mark.parametrize(
    "bad",
    [
        b"\xc1garbage",
        pack({"v": 2, "nodes": []}),
        pack({"v": 1, "nodes": [{"name": "str", "type": "file"}]}),
        pack({"v": 1, "nodes": [{"name": b"x", "type": "weird"}]}),
        pack({"v": 1}),
    ],
)
def test_tree_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(FormatError):
        tree_from_bytes(bad)


def test_pack_header_and_index_roundtrip() -> None:
    entries = [PackEntry(0, b"a" * 32, 84, 100, 72, 0), PackEntry(1, b"b" * 32, 184, 50, 200, 1)]
    assert header_from_bytes(header_to_bytes(entries)) == entries
    idx = IndexFile([IndexedPack(b"p" * 32, 1000, b"k" * 80, entries)], [b"s" * 32])
    back = IndexFile.from_bytes(idx.to_bytes())
    assert back.packs == idx.packs and back.supersedes == idx.supersedes


def test_snapshot_roundtrip() -> None:
    s = Snapshot(123, "host", "me", ["/a", "/b"], b"t" * 32, ["x"], b"p" * 32, summary={"n": 1})
    back = Snapshot.from_bytes(s.to_bytes(), "abc")
    assert (back.time_ns, back.paths, back.tree, back.parent, back.tags, back.id) == (
        123,
        ["/a", "/b"],
        b"t" * 32,
        b"p" * 32,
        ["x"],
        "abc",
    )


def test_config_header_version_check() -> None:
    newer = CONFIG_HEADER.pack(CONFIG_MAGIC, 2) + b"body"
    with pytest.raises(UnsupportedVersion, match="upgrade safehold"):
        split_config(newer)
    with pytest.raises(FormatError):
        split_config(b"NOTSAFEH\x01\x00rest")
    assert split_config(CONFIG_HEADER.pack(CONFIG_MAGIC, 1) + b"body") == b"body"
