"""Identifiers: content ids of blobs, storage ids of objects, and object names in a repository."""

from __future__ import annotations

import enum

import blake3

ID_LEN = 32
"""Every id is 32 bytes; shown as 64 lowercase hex digits."""


class BlobType(enum.IntEnum):
    """What a blob in a pack holds."""

    DATA = 0
    TREE = 1


def storage_id(data: bytes | memoryview) -> str:
    """The name-giving id of a stored object: unkeyed BLAKE3 of its stored bytes, in hex.

    Anyone can verify a stored object against its name without a key.
    """
    return blake3.blake3(data).hexdigest()


def storage_hasher() -> blake3.blake3:
    """An incremental hasher whose ``hexdigest()`` is the storage id of everything fed to it."""
    return blake3.blake3()


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


def index_name(index_id: str) -> str:
    return f"index/{index_id}"


def snapshot_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def plan_name(plan_id: str) -> str:
    return f"plans/{plan_id}"


def key_name(key_id: str) -> str:
    return f"keys/{key_id}"


def lock_name(lock_id: str) -> str:
    return f"locks/{lock_id}"


CONFIG_NAME = "config"


def name_to_id(name: str) -> str:
    """The id part of an object name (its last path component)."""
    return name.rsplit("/", 1)[-1]


def is_hex_id(text: str) -> bool:
    if len(text) != 2 * ID_LEN:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()
