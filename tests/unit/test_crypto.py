from __future__ import annotations

import pytest

from safehold import crypto
from safehold.errors import IntegrityError


def test_seal_roundtrip_and_wrong_key() -> None:
    priv, pub = crypto.generate_keypair()
    other, _ = crypto.generate_keypair()
    key = crypto.random_key()
    sealed = crypto.seal_key(pub, key)
    assert len(sealed) == crypto.SEALED_KEY_LEN
    assert crypto.unseal_key(priv, sealed) == key
    with pytest.raises(IntegrityError):
        crypto.unseal_key(other, sealed)
    # sealing is randomized: the same key sealed twice gives different bytes
    assert crypto.seal_key(pub, key) != sealed


@pytest.mark.parametrize("pos", [0, 31, 32, 50, 79])
def test_sealed_key_tamper_detected(pos: int) -> None:
    priv, pub = crypto.generate_keypair()
    sealed = bytearray(crypto.seal_key(pub, crypto.random_key()))
    sealed[pos] ^= 1
    with pytest.raises(IntegrityError):
        crypto.unseal_key(priv, bytes(sealed))


def test_content_id_is_keyed() -> None:
    k1, k2 = crypto.random_key(), crypto.random_key()
    assert crypto.content_id(k1, b"abc") == crypto.content_id(k1, b"abc")
    assert crypto.content_id(k1, b"abc") != crypto.content_id(k2, b"abc")
    assert len(crypto.content_id(k1, b"")) == 32


def test_aead_detects_tampering() -> None:
    key = crypto.random_key()
    nonce = crypto.counter_nonce(7)
    ct = bytearray(crypto.encrypt(key, nonce, b"secret data"))
    assert crypto.decrypt(key, nonce, bytes(ct)) == b"secret data"
    ct[0] ^= 0x80
    with pytest.raises(IntegrityError):
        crypto.decrypt(key, nonce, bytes(ct))


def test_kdf_defaults_are_strong_and_deterministic() -> None:
    p = crypto.KdfParams()
    assert p.memory_kib >= 64 * 1024 and p.time_cost >= 3
    fast = crypto.KdfParams(1, 1024, 1)
    salt = b"s" * 16
    assert crypto.derive_kek(b"pw", salt, fast) == crypto.derive_kek(b"pw", salt, fast)
    assert crypto.derive_kek(b"pw", salt, fast) != crypto.derive_kek(b"pw2", salt, fast)


def test_counter_nonces_are_distinct() -> None:
    assert len({crypto.counter_nonce(i) for i in range(1000)}) == 1000
