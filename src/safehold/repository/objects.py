"""The envelope of standalone encrypted objects (config body, index, snapshot).

Layout (docs/format.md, "Object envelope")::

    "SHO1" | mode u8 | kind u8 | codec u8 | 0 | key material | AES-256-GCM(ciphertext || tag)

mode 1 (sealed): key material is the 80-byte sealed data key, readable only with the repository's
private key. mode 2 (meta): key material is a 32-byte random salt; the object key is derived from
the meta key, which write-only keys also hold. The nonce is 12 zero bytes: each object has a key of
its own. The AAD is every header byte before the ciphertext.
"""

from __future__ import annotations

import enum
import os
import threading

from safehold import crypto
from safehold.compress import Codec, Compression, compress, decompress
from safehold.errors import FormatError, IntegrityError

OBJECT_MAGIC = b"SHO1"
MAX_OBJECT_PLAINTEXT = 1 << 31
"""No object's plaintext is longer (docs/format.md §5)."""
MAX_CONFIG_PLAINTEXT = 1 << 16
"""A config's plaintext is a few hundred bytes; readers refuse more than 64 KiB."""
RATIO_FLOOR = 16 << 20
RATIO = 8
"""A compressed payload of n bytes (exactly one zstd frame: nothing may follow it) may expand to
at most max(RATIO_FLOOR, RATIO * n) bytes: index objects and plans are mostly random ids and keys
(zstd shrinks them by a third at most: an index object of 100,000 blob entries compresses 1.3:1),
and a snapshot is far below the floor (its paths and tags come from a command line), so an
honest object is far inside this, while a planted one costs at most 8 bytes of memory per byte
stored (docs/format.md §5)."""

_LARGE = threading.Lock()
"""Held while an object's payload whose bound exceeds :data:`RATIO_FLOOR` is decompressed: the
index is loaded on several threads, and several planted objects must not each hold their
bound's worth of output at once."""


class Mode(enum.IntEnum):
    SEALED = 1
    META = 2


class Kind(enum.IntEnum):
    CONFIG = 1
    INDEX = 2
    SNAPSHOT = 3
    PLAN = 4


KIND_MODE = {
    Kind.CONFIG: Mode.META,
    Kind.INDEX: Mode.META,
    Kind.SNAPSHOT: Mode.SEALED,
    Kind.PLAN: Mode.META,
}
"""The one mode each kind is written in; readers refuse any other."""

_COMPRESS = Compression("zstd", 3)


def seal_object(plaintext: bytes, kind: Kind, *, public_key: bytes) -> bytes:
    """Encrypt an object so that only holders of the repository's private key can read it."""
    data_key = crypto.random_key()
    body, codec = compress(plaintext, _COMPRESS)
    header = (
        OBJECT_MAGIC + bytes([Mode.SEALED, kind, codec, 0]) + crypto.seal_key(public_key, data_key)
    )
    return header + crypto.encrypt(data_key, bytes(crypto.NONCE_LEN), body, header)


def meta_object(plaintext: bytes, kind: Kind, *, meta_key: bytes) -> bytes:
    """Encrypt an object under the meta key (index, config)."""
    salt = os.urandom(32)
    body, codec = compress(plaintext, _COMPRESS)
    header = OBJECT_MAGIC + bytes([Mode.META, kind, codec, 0]) + salt
    key = crypto.meta_object_key(meta_key, salt)
    return header + crypto.encrypt(key, bytes(crypto.NONCE_LEN), body, header)


def open_object(
    data: bytes, kind: Kind, *, meta_key: bytes, private_key: bytes | None, what: str
) -> bytes:
    """Authenticate, decrypt and decompress an object written by seal_object or meta_object."""
    if len(data) < 8 or data[:4] != OBJECT_MAGIC:
        raise IntegrityError(f"{what} is not a safehold object (bad magic)")
    mode, got_kind, codec = data[4], data[5], data[6]
    if got_kind != kind:
        raise FormatError(f"{what} holds a different kind of object ({got_kind}, expected {kind})")
    if mode != KIND_MODE[kind] or data[7] != 0:
        raise IntegrityError(f"{what} has a wrong encryption mode for its kind (tampered?)")
    if mode == Mode.SEALED:
        end = 8 + crypto.SEALED_KEY_LEN
        if private_key is None:
            raise IntegrityError(f"{what} can only be read with a full key")
        if len(data) < end + crypto.TAG_LEN:
            raise IntegrityError(f"{what} is truncated")
        key = crypto.unseal_key(private_key, data[8:end])
    elif mode == Mode.META:
        end = 8 + 32
        if len(data) < end + crypto.TAG_LEN:
            raise IntegrityError(f"{what} is truncated")
        key = crypto.meta_object_key(meta_key, data[8:end])
    else:
        raise FormatError(f"{what} uses unknown encryption mode {mode}")
    try:
        body = crypto.decrypt(key, bytes(crypto.NONCE_LEN), memoryview(data)[end:], data[:end])
    except IntegrityError:
        raise IntegrityError(f"{what} failed authentication (corrupt or tampered)") from None
    if codec == Codec.NONE:
        return body
    limit = max_plaintext(kind, len(body))
    if limit <= RATIO_FLOOR:
        return bytes(decompress(body, codec, limit, what=what, bound="allowed"))
    with _LARGE:
        return bytes(decompress(body, codec, limit, what=what, bound="allowed"))


def max_plaintext(kind: Kind, payload_len: int) -> int:
    """The most an object's payload of ``payload_len`` compressed bytes may expand to."""
    limit = min(MAX_OBJECT_PLAINTEXT, max(RATIO_FLOOR, RATIO * payload_len))
    return min(limit, MAX_CONFIG_PLAINTEXT) if kind == Kind.CONFIG else limit
