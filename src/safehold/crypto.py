"""Cryptographic transforms: key derivation, content ids, sealing keys to the repository, AEAD.

No I/O. The constructions are specified byte for byte in docs/format.md:

* content id: keyed BLAKE3 (``id_key``) of a blob's plaintext;
* password → key-encryption key: Argon2id with the parameters stored in the key file;
* a fresh random 32-byte data key per pack or sealed object, wrapped for the repository's X25519
  public key (ephemeral X25519, BLAKE3 derive-key, AES-256-GCM), so that a writer needs only the
  public key and can never decrypt what is stored;
* AES-256-GCM for every blob and object, nonces from a counter under a key used for one object only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import blake3
from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from safehold.errors import IntegrityError, SafeholdError

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
SEALED_KEY_LEN = 32 + KEY_LEN + TAG_LEN  # ephemeral public key, wrapped data key, tag = 80
SEAL_CONTEXT = "safehold v1 2026-11 seal data key"
META_CONTEXT = "safehold v1 2026-11 meta object key"


KDF_MAX_TIME = 10
KDF_MAX_MEMORY_KIB = 1 << 20  # 1 GiB
KDF_MAX_PARALLELISM = 16
KDF_MIN_SALT = 8
"""Readers refuse a key file whose Argon2id parameters lie outside t 1 ... 10, m 8p ... 1 GiB,
p 1 ... 16, or whose salt is shorter than 8 bytes, without running the KDF
(docs/format.md §7.1): a planted key file cannot make every open take minutes."""


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id parameters, stored in each key file."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 2

    @classmethod
    def from_env(cls) -> KdfParams:
        """Defaults, or ``SAFEHOLD_KDF=t,m_kib,p`` (for tests; never weaker than t=1, m=8 KiB)."""
        spec = os.environ.get("SAFEHOLD_KDF")
        if not spec:
            return cls()
        t, m, p = (int(x) for x in spec.split(","))
        return cls(max(t, 1), max(m, 8), max(p, 1))

    def problem(self) -> str | None:
        """Why a reader refuses these parameters (out of the documented caps), or None."""
        if not 1 <= self.time_cost <= KDF_MAX_TIME:
            return f"Argon2id time cost {self.time_cost} is outside 1 ... {KDF_MAX_TIME}"
        if not 1 <= self.parallelism <= KDF_MAX_PARALLELISM:
            return f"Argon2id parallelism {self.parallelism} is outside 1 ... {KDF_MAX_PARALLELISM}"
        if not 8 * self.parallelism <= self.memory_kib <= KDF_MAX_MEMORY_KIB:
            return (
                f"Argon2id memory {self.memory_kib} KiB is outside {8 * self.parallelism} ... "
                f"{KDF_MAX_MEMORY_KIB} KiB"
            )
        return None

    @property
    def cost(self) -> int:
        """A measure of the work one derivation takes (passes x memory)."""
        return self.time_cost * self.memory_kib


def derive_kek(password: bytes, salt: bytes, params: KdfParams) -> bytes:
    """The key-encryption key of a key file: Argon2id(password, salt) → 32 bytes."""
    try:
        return hash_secret_raw(
            password,
            salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=KEY_LEN,
            type=Type.ID,
        )
    except HashingError as e:
        raise SafeholdError(f"key derivation failed: {e}") from None


def random_key() -> bytes:
    return os.urandom(KEY_LEN)


def content_id(id_key: bytes, data: bytes | memoryview) -> bytes:
    """A blob's id: BLAKE3 keyed with the repository's id key, 32 bytes."""
    return blake3.blake3(data, key=id_key).digest()


def counter_nonce(counter: int) -> bytes:
    """The nonce for message number ``counter`` under a key that encrypts one object only."""
    return counter.to_bytes(NONCE_LEN, "little")


def encrypt(key: bytes, nonce: bytes, plaintext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """AES-256-GCM; returns ciphertext || tag."""
    return AESGCM(key).encrypt(nonce, plaintext, aad or None)


def decrypt(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes = b"") -> bytes:
    """AES-256-GCM; raises IntegrityError when authentication fails."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad or None)
    except InvalidTag:
        raise IntegrityError(
            "authentication failed: data is corrupt or was tampered with"
        ) from None


class Aead:
    """An AES-256-GCM key object, reused for the many blobs of one pack."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, nonce: bytes, plaintext: bytes | memoryview) -> bytes:
        return self._aead.encrypt(nonce, plaintext, None)

    def encrypt_into(self, nonce: bytes, plaintext: bytes | memoryview, out: memoryview) -> int:
        """Encrypt into ``out`` (exactly ``len(plaintext) + TAG_LEN`` bytes); no allocation."""
        n: int = self._aead.encrypt_into(nonce, plaintext, None, out)
        return n

    def decrypt(self, nonce: bytes, ciphertext: bytes | memoryview) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, None)
        except InvalidTag:
            raise IntegrityError(
                "authentication failed: data is corrupt or was tampered with"
            ) from None


def generate_keypair() -> tuple[bytes, bytes]:
    """A new X25519 key pair for a repository: (private, public), 32 raw bytes each."""
    priv = X25519PrivateKey.generate()
    return priv.private_bytes_raw(), priv.public_key().public_bytes_raw()


def public_from_private(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _wrap_key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return blake3.blake3(shared + eph_pub + recipient_pub, derive_key_context=SEAL_CONTEXT).digest()


def seal_key(recipient_pub: bytes, data_key: bytes) -> bytes:
    """Wrap ``data_key`` for the holder of the private key of ``recipient_pub`` (80 bytes)."""
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    wrap = _wrap_key(shared, eph_pub, recipient_pub)
    return eph_pub + AESGCM(wrap).encrypt(bytes(NONCE_LEN), data_key, eph_pub)


def unseal_key(private: bytes, sealed: bytes | memoryview) -> bytes:
    """Unwrap a key made by :func:`seal_key`; IntegrityError if it was not sealed to this key."""
    sealed = bytes(sealed)
    if len(sealed) != SEALED_KEY_LEN:
        raise IntegrityError("sealed key has the wrong length")
    priv = X25519PrivateKey.from_private_bytes(private)
    eph_pub = sealed[:32]
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:
        raise IntegrityError("sealed key is invalid") from None
    wrap = _wrap_key(shared, eph_pub, priv.public_key().public_bytes_raw())
    return decrypt(wrap, bytes(NONCE_LEN), sealed[32:], eph_pub)


def meta_object_key(meta_key: bytes, salt: bytes) -> bytes:
    """The one-object key of a meta-encrypted object (index, config): derived from a random salt."""
    return blake3.blake3(meta_key + salt, derive_key_context=META_CONTEXT).digest()
