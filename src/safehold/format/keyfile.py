"""Key files (``keys/<id>``): JSON in the clear around the Argon2id-wrapped repository secrets."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from safehold.errors import FormatError
from safehold.format.common import (
    FORMAT_VERSION,
    check_version,
    field,
    need_map,
    opt,
    pack,
    unpack,
)


@dataclass(frozen=True, slots=True)
class Secrets:
    """What a key unlocks. A write-only key (a later feature) has no ``private_key``."""

    repo_id: bytes
    meta_key: bytes
    id_key: bytes
    chunker_seed: int
    public_key: bytes
    private_key: bytes | None
    config: bytes | None = None
    """A copy of the config's plaintext (docs/format.md §7.2), so that a damaged ``config``
    object does not lock the repository; absent in key files made before the copy existed."""

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "repo_id": self.repo_id,
            "meta_key": self.meta_key,
            "id_key": self.id_key,
            "chunker_seed": self.chunker_seed,
            "public_key": self.public_key,
        }
        if self.private_key is not None:
            obj["private_key"] = self.private_key
        if self.config is not None:
            obj["config"] = self.config
        return pack(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> Secrets:
        what = "key secrets"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)
        secrets = cls(
            repo_id=field(obj, "repo_id", bytes, what),
            meta_key=field(obj, "meta_key", bytes, what),
            id_key=field(obj, "id_key", bytes, what),
            chunker_seed=field(obj, "chunker_seed", int, what),
            public_key=field(obj, "public_key", bytes, what),
            private_key=opt(obj, "private_key", bytes, what, None),
            config=opt(obj, "config", bytes, what, None),
        )
        if len(secrets.repo_id) != 16:
            raise FormatError("key secrets have a malformed repo_id")
        keys = (secrets.meta_key, secrets.id_key, secrets.public_key, secrets.private_key)
        if any(k is not None and len(k) != 32 for k in keys):
            raise FormatError("key secrets hold a key of the wrong length")
        if not 0 <= secrets.chunker_seed < 1 << 64:
            raise FormatError("key secrets have a malformed chunker seed")
        if secrets.config is not None and len(secrets.config) > MAX_CONFIG_COPY:
            raise FormatError("key secrets hold an oversized config copy")
        return secrets


MAX_KEY_FILE = 1 << 20
"""Readers refuse a key file larger than this (1 MiB) without parsing it."""
MAX_CONFIG_COPY = 1 << 16
"""The config copy in the secrets is at most 64 KiB (the config's own limit)."""


@dataclass(frozen=True, slots=True)
class KeyFile:
    kind: str  # "full" (later also "write-only")
    created: str  # RFC 3339 UTC
    host: str
    user: str
    kdf_time: int
    kdf_memory_kib: int
    kdf_parallelism: int
    salt: bytes
    sealed: bytes  # nonce (12) || AES-256-GCM(kek, secrets, aad=b"safehold key v1")

    def to_bytes(self) -> bytes:
        obj = {
            "v": FORMAT_VERSION,
            "kind": self.kind,
            "created": self.created,
            "host": self.host,
            "user": self.user,
            "kdf": {
                "algo": "argon2id",
                "t": self.kdf_time,
                "m": self.kdf_memory_kib,
                "p": self.kdf_parallelism,
                "salt": base64.b64encode(self.salt).decode(),
            },
            "data": base64.b64encode(self.sealed).decode(),
        }
        return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyFile:
        what = "key file"
        if len(data) > MAX_KEY_FILE:
            raise FormatError(f"key file is larger than {MAX_KEY_FILE} bytes")
        try:
            obj = need_map(json.loads(data), what)
        except (ValueError, RecursionError):
            raise FormatError("key file is not valid JSON") from None
        check_version(obj, what)
        kdf = need_map(field(obj, "kdf", dict, what), what)
        if field(kdf, "algo", str, what) != "argon2id":
            raise FormatError("key file names an unknown key derivation")
        try:
            salt = base64.b64decode(field(kdf, "salt", str, what), validate=True)
            sealed = base64.b64decode(field(obj, "data", str, what), validate=True)
        except ValueError:
            raise FormatError("key file has invalid base64") from None
        return cls(
            kind=field(obj, "kind", str, what),
            created=field(obj, "created", str, what),
            host=field(obj, "host", str, what),
            user=field(obj, "user", str, what),
            kdf_time=field(kdf, "t", int, what),
            kdf_memory_kib=field(kdf, "m", int, what),
            kdf_parallelism=field(kdf, "p", int, what),
            salt=salt,
            sealed=sealed,
        )
