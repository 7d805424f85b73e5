"""A fuzz target per parser of stored or received data (issue 8): config, key file, object
envelope, pack header and trailer, index, tree, snapshot, prune plan, lock, and the frames of
the serve protocol. Each may only return or raise its documented error (a SafeholdError: a
FormatError/IntegrityError for stored data), and stays within a memory bound.

CI runs each target for a fixed number of examples; ``python fuzz/run.py --examples 100000``
runs them longer (tests/fuzz/harness.py).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import struct
from typing import Any

import zstandard
from hypothesis import example, given
from hypothesis import strategies as st

from safehold import crypto
from safehold.backends.memory import MemoryBackend
from safehold.backends.remote import read_message
from safehold.compress import decompress, frame_end
from safehold.format.config import CONFIG_HEADER, CONFIG_MAGIC, Config, split_config
from safehold.format.index import IndexFile
from safehold.format.keyfile import KeyFile, Secrets
from safehold.format.pack import (
    PACK_END_MAGIC,
    PACK_PREFIX_LEN,
    TRAILER,
    check_entries,
    header_from_bytes,
    parse_trailer,
)
from safehold.format.plan import PlanFile
from safehold.format.snapshot import Snapshot
from safehold.format.tree import tree_from_bytes
from safehold.repository.keys import parse_key_file, verify_key_file
from safehold.repository.locks import list_locks
from safehold.repository.objects import OBJECT_MAGIC, Kind, Mode, open_object
from tests.fuzz.harness import FUZZ, call, msgpack_inputs

ID = b"\x11" * 32
ID2 = b"\x22" * 32
SEALED = b"\x33" * 80

VALID_CONFIG: dict[str, Any] = {
    "v": 1,
    "repo_id": b"\x01" * 16,
    "chunker": {"algo": "fastcdc2020", "avg": 1 << 20, "min": 1 << 18, "max": 1 << 22, "nc": 1},
    "compression": "auto",
    "pack_size": 16 << 20,
    "public_key": b"\x02" * 32,
    "created": 1_700_000_000_000_000_000,
}
VALID_ENTRY = [0, ID, 84, 128, 100, 1]
VALID_HEADER: dict[str, Any] = {"v": 1, "blobs": [VALID_ENTRY, [1, ID2, 212, 40, 12, 0]]}
VALID_INDEX: dict[str, Any] = {
    "v": 1,
    "packs": [{"id": ID, "size": 4096, "key": SEALED, "blobs": [VALID_ENTRY]}],
    "supersedes": [ID2],
}
VALID_NODE: dict[str, Any] = {
    "name": b"file.txt",
    "type": "file",
    "mode": 0o100644,
    "uid": 1000,
    "gid": 1000,
    "user": "u",
    "group": "g",
    "mtime": 1,
    "ctime": 2,
    "atime": 3,
    "size": 5,
    "dev": 1,
    "ino": 2,
    "nlink": 1,
    "content": [ID],
    "xattrs": {b"user.a": b"b"},
}
VALID_TREE: dict[str, Any] = {
    "v": 1,
    "nodes": [VALID_NODE, VALID_NODE | {"name": b"d", "type": "dir", "subtree": ID2}],
}
VALID_SNAPSHOT: dict[str, Any] = {
    "v": 1,
    "time": 1,
    "host": "h",
    "user": "u",
    "uid": 0,
    "gid": 0,
    "paths": ["/a"],
    "tags": ["t"],
    "parent": None,
    "tree": ID,
    "program": "safehold",
    "summary": {"files": 1},
}
VALID_PLAN: dict[str, Any] = {
    "v": 1,
    "time": 5,
    "condemned": [ID],
    "superseded": [ID2],
    "indexes": [ID],
    "snapshots": [ID2],
    "locks": ["ab" * 32],
    "grace": 3600.0,
}
VALID_SECRETS: dict[str, Any] = {
    "v": 1,
    "repo_id": b"\x01" * 16,
    "meta_key": b"\x02" * 32,
    "id_key": b"\x03" * 32,
    "chunker_seed": 12345,
    "public_key": b"\x04" * 32,
    "private_key": b"\x05" * 32,
    "config": b"\x80",
}
VALID_KEY_FILE: dict[str, Any] = {
    "v": 1,
    "kind": "full",
    "created": "2026-01-01T00:00:00.000000Z",
    "host": "h",
    "user": "u",
    "kdf": {
        "algo": "argon2id",
        "t": 3,
        "m": 65536,
        "p": 2,
        "salt": base64.b64encode(b"s" * 16).decode(),
    },
    "data": base64.b64encode(b"d" * 60).decode(),
}
VALID_LOCK: dict[str, Any] = {
    "v": 1,
    "host": "elsewhere",
    "pid": 1,
    "user": "x",
    "time": 1_700_000_000.0,
    "expires": 1_700_000_300.0,
    "exclusive": False,
    "op": "backup",
}


@st.composite
def msgpack_for(draw: Any, valid: Any) -> bytes:
    return msgpack_inputs(draw, valid)


# --- msgpack objects ----------------------------------------------------------------------------


@FUZZ
@given(msgpack_for(VALID_CONFIG))
def test_fuzz_config(data: bytes) -> None:
    got = call(lambda: Config.from_bytes(data))
    if isinstance(got, Config):
        assert got.problem() is None


@FUZZ
@given(
    st.binary(max_size=64)
    | st.builds(
        lambda v, b: CONFIG_HEADER.pack(CONFIG_MAGIC, v) + b,
        st.integers(0, 0xFFFF),
        st.binary(max_size=64),
    )
)
def test_fuzz_config_clear_header(data: bytes) -> None:
    call(lambda: split_config(data))  # UnsupportedVersion is a SafeholdError too


@FUZZ
@given(msgpack_for(VALID_HEADER))
def test_fuzz_pack_header(data: bytes) -> None:
    got = call(lambda: header_from_bytes(data))
    if isinstance(got, list):
        call(lambda: check_entries(got, 4096))


@FUZZ
@given(
    st.binary(min_size=0, max_size=12)
    | st.builds(lambda n: TRAILER.pack(n, PACK_END_MAGIC), st.integers(0, (1 << 32) - 1)),
    st.integers(0, 1 << 45),
)
@example(TRAILER.pack(0xFFFFFF00, PACK_END_MAGIC), 5 << 30)
@example(TRAILER.pack(0xFFFFFF00, PACK_END_MAGIC), 98_000)
def test_fuzz_pack_trailer(tail: bytes, size: int) -> None:
    got = call(lambda: parse_trailer(tail, size))
    if isinstance(got, tuple):
        offset, length = got
        assert offset >= PACK_PREFIX_LEN and 16 <= length <= (1 << 30) + (1 << 20)
        assert offset + length + TRAILER.size == size


@FUZZ
@given(msgpack_for(VALID_INDEX))
def test_fuzz_index(data: bytes) -> None:
    call(lambda: IndexFile.from_bytes(data))


@FUZZ
@given(msgpack_for(VALID_TREE))
def test_fuzz_tree(data: bytes) -> None:
    call(lambda: tree_from_bytes(data))


@FUZZ
@given(msgpack_for(VALID_SNAPSHOT))
def test_fuzz_snapshot(data: bytes) -> None:
    call(lambda: Snapshot.from_bytes(data, "ab" * 32))


@FUZZ
@given(msgpack_for(VALID_PLAN))
def test_fuzz_plan(data: bytes) -> None:
    call(lambda: PlanFile.from_bytes(data))


@FUZZ
@given(msgpack_for(VALID_SECRETS))
def test_fuzz_key_secrets(data: bytes) -> None:
    call(lambda: Secrets.from_bytes(data))


# --- key files (JSON) ---------------------------------------------------------------------------


def _json_values() -> st.SearchStrategy[Any]:
    scalar = (
        st.none()
        | st.booleans()
        | st.integers(-(1 << 70), 1 << 70)
        | st.floats(allow_nan=False)
        | st.text(max_size=12)
    )
    return st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=16,
    )


@st.composite
def key_file_inputs(draw: Any) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return bytes(draw(st.binary(max_size=400)))
    if kind == 1:
        depth = draw(st.integers(1, 200_000))
        return b"[" * depth  # nesting deeper than the JSON parser's recursion
    obj = json.loads(json.dumps(VALID_KEY_FILE))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "kdf"]))
        target = obj if where == "top" or not isinstance(obj.get("kdf"), dict) else obj["kdf"]
        key = draw(st.sampled_from([*sorted(target), "extra"]))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(
                _json_values()
                | st.sampled_from([0, 11, 100, 1 << 20, (1 << 20) + 1, 4 << 20, 1 << 40, -1])
                | st.sampled_from(["", "!!!", base64.b64encode(b"x" * 7).decode()])
            )
    text = json.dumps(obj)
    if kind == 4:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@FUZZ
@given(key_file_inputs())
@example(b"[" * 100_000)
@example(json.dumps(VALID_KEY_FILE | {"kdf": VALID_KEY_FILE["kdf"] | {"m": 4 << 20}}).encode())
def test_fuzz_key_file(data: bytes) -> None:
    call(lambda: KeyFile.from_bytes(data))
    got = call(lambda: parse_key_file(data))
    if isinstance(got, KeyFile):
        params = crypto.KdfParams(got.kdf_time, got.kdf_memory_kib, got.kdf_parallelism)
        assert params.problem() is None
    why = call(lambda: verify_key_file("keys/" + "ab" * 32, data))
    assert isinstance(why, str)  # never matches that name


# --- the object envelope ------------------------------------------------------------------------

META_KEY = b"\x42" * 32
PRIVATE, PUBLIC = crypto.generate_keypair()


@functools.cache
def _bomb(size: int, content_size: bool) -> bytes:
    c = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    co = c.compressobj(size=size if content_size else -1)
    zero = bytes(1 << 20)
    return b"".join([co.compress(zero) for _ in range(size >> 20)] + [co.flush()])


@st.composite
def payloads(draw: Any) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return bytes(draw(st.binary(max_size=200)))
    if kind == 1:
        return _bomb(draw(st.sampled_from([64 << 20, 1 << 30])), draw(st.booleans()))
    if kind == 5:  # a bomb, then bytes after the frame (once they lifted the bound)
        bomb = _bomb(draw(st.sampled_from([64 << 20, 1 << 30])), draw(st.booleans()))
        return bomb + bytes(draw(st.binary(min_size=1, max_size=64))) * 1000
    raw = bytes(draw(st.binary(max_size=2000)))
    frame = zstandard.ZstdCompressor(write_content_size=draw(st.booleans())).compress(raw)
    if kind == 2:
        return frame
    if kind == 6:
        return frame + bytes(draw(st.binary(min_size=1, max_size=100)))
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    return bytes(data)[: draw(st.integers(0, len(data)))] if kind == 4 else bytes(data)


@st.composite
def envelopes(draw: Any) -> tuple[bytes, Kind]:
    kind = draw(st.sampled_from(list(Kind)))
    if draw(st.integers(0, 4)) == 0:
        return bytes(draw(st.binary(max_size=300))), kind
    mode = draw(st.sampled_from([Mode.META, Mode.SEALED, 0, 3]))
    codec = draw(st.sampled_from([0, 1, 2, 255]))
    head = OBJECT_MAGIC + bytes([mode, draw(st.sampled_from([kind, *Kind])), codec, 0])
    payload = draw(payloads())
    if mode == Mode.SEALED:
        data_key = crypto.random_key()
        head += crypto.seal_key(PUBLIC, data_key)
        key = data_key
    else:
        salt = os.urandom(32)
        head += salt
        key = crypto.meta_object_key(META_KEY, salt)
    data = head + crypto.encrypt(key, bytes(12), payload, head)  # authentic: parsing goes on
    if draw(st.integers(0, 5)) == 0:
        flip = bytearray(data)
        flip[draw(st.integers(0, len(flip) - 1))] ^= 1
        data = bytes(flip)
    return data, kind


@st.composite
def zstd_payloads(draw: Any) -> tuple[bytes, bytes | None]:
    """A zstd payload and the plaintext it must give (None: it must be refused): writers'
    frames, frames with bytes after them, frames cut short or bit-flipped, and hand-made frames
    of random block headers (empty, raw, RLE and reserved blocks, with or without a checksum)."""
    kind = draw(st.integers(0, 4))
    raw = bytes(draw(st.binary(max_size=3000))) * draw(st.integers(1, 50))
    c = zstandard.ZstdCompressor(
        level=draw(st.sampled_from([1, 3, 19])),
        write_content_size=draw(st.booleans()),
        write_checksum=draw(st.booleans()),
    )
    frame = c.compress(raw)
    if kind == 0:
        return frame, raw
    if kind == 1:
        return frame + bytes(draw(st.binary(min_size=1, max_size=200))), None
    if kind == 2:
        return frame[: draw(st.integers(0, len(frame) - 1))], None
    if kind == 3:
        data = bytearray(frame)
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data), b"?"  # may still decompress (a flipped literal): anything bounded
    head = bytearray(b"\x28\xb5\x2f\xfd\x00\x58")  # no size, no checksum, 1 MiB window
    blocks = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 17)), max_size=40))
    for i, (typ, size) in enumerate(blocks):
        last = i == len(blocks) - 1
        head += (int(last) | typ << 1 | size << 3).to_bytes(3, "little")
        head += bytes([7]) if typ == 1 else bytes(draw(st.binary(max_size=64)))
    return bytes(head), b"?"


@FUZZ
@given(zstd_payloads(), st.sampled_from([0, 100, 1 << 20, 16 << 20]))
def test_fuzz_decompress(case: tuple[bytes, bytes | None], max_len: int) -> None:
    data, want = case
    got = call(lambda: decompress(data, 1, max_len, what="payload"), bound=max_len + (8 << 20))
    if isinstance(got, bytes | memoryview):
        assert len(got) <= max_len and want is not None
        assert frame_end(data) == len(data)
        if want != b"?":
            assert bytes(got) == want
    elif want not in (None, b"?"):
        assert len(want) > max_len, got  # a writer's frame is refused only above the bound


@FUZZ
@given(envelopes())
def test_fuzz_envelope(case: tuple[bytes, Kind]) -> None:
    data, kind = case
    got = call(
        lambda: open_object(data, kind, meta_key=META_KEY, private_key=PRIVATE, what="object")
    )
    if isinstance(got, bytes):
        assert len(got) <= max(16 << 20, 64 * len(data))


# --- locks --------------------------------------------------------------------------------------


@st.composite
def lock_inputs(draw: Any) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return bytes(draw(st.binary(max_size=300)))
    if kind == 1:
        return b"[" * draw(st.integers(1, 100_000))
    obj = dict(VALID_LOCK)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(obj), "boot_id", "start"]))
        obj[key] = draw(
            _json_values() | st.sampled_from([1e308, -1e308, 32503680000.0, 1 << 70, "nan"])
        )
    text = json.dumps(obj)
    if kind == 3:
        text = text.replace("1e+308", "1e400")  # JSON's infinity
    return text.encode()


def _list_locks(data: bytes) -> None:
    backend = MemoryBackend("fuzz")
    backend.store("locks/" + "cd" * 32, data)
    for info in list_locks(backend):
        info.stale()
        info.describe()


@FUZZ
@given(lock_inputs())
@example(json.dumps(VALID_LOCK | {"pid": 1e308}).replace("1e+308", "1e400").encode())
@example(b"[" * 100_000)
@example(json.dumps(VALID_LOCK | {"time": 1e300}).encode())
def test_fuzz_lock(data: bytes) -> None:
    call(lambda: _list_locks(data))


# --- serve protocol frames ----------------------------------------------------------------------


@st.composite
def frames(draw: Any) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return bytes(draw(st.binary(max_size=300)))
    body = msgpack_inputs(draw, {"ok": True, "data": b"x" * 10, "items": [["a", 1]]})
    n = len(body) if kind != 2 else draw(st.integers(0, (1 << 32) - 1))
    return struct.pack(">I", n) + body


@FUZZ
@given(frames())
@example(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
@example(b"\x00\x00")
def test_fuzz_serve_frames_only_safehold_errors(data: bytes) -> None:
    stream = io.BytesIO(data)
    for _ in range(4):
        if not isinstance(call(lambda: read_message(stream)), dict):
            break


def test_frame_claiming_a_gigabyte_allocates_nothing_like_it() -> None:
    r, w = os.pipe()
    os.write(w, struct.pack(">I", 1 << 30) + b"abc")
    os.close(w)
    with open(r, "rb") as stream:
        call(lambda: read_message(stream), bound=64 << 20)
