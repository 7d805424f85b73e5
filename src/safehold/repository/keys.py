"""Creating and opening key files: the password unlocks the repository secrets via Argon2id."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket

from safehold import crypto
from safehold.errors import FormatError, IntegrityError
from safehold.format.keyfile import KeyFile, Secrets

KEY_AAD = b"safehold key v1"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def make_key_file(secrets: Secrets, password: bytes, params: crypto.KdfParams) -> bytes:
    salt = os.urandom(16)
    kek = crypto.derive_kek(password, salt, params)
    nonce = os.urandom(crypto.NONCE_LEN)  # the KEK is unique per salt; the nonce is belt and braces
    sealed = nonce + crypto.encrypt(kek, nonce, secrets.to_bytes(), KEY_AAD)
    kind = "full" if secrets.private_key is not None else "write-only"
    return KeyFile(
        kind=kind,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        host=socket.gethostname(),
        user=_user(),
        kdf_time=params.time_cost,
        kdf_memory_kib=params.memory_kib,
        kdf_parallelism=params.parallelism,
        salt=salt,
        sealed=sealed,
    ).to_bytes()


def try_key_file(data: bytes, password: bytes) -> Secrets | None:
    """The secrets of a key file if ``password`` opens it, else None."""
    kf = KeyFile.from_bytes(data)
    if not (1 <= kf.kdf_time <= 100 and 8 <= kf.kdf_memory_kib <= 4 << 20):
        raise FormatError("key file has out-of-range key derivation parameters")
    if not 1 <= kf.kdf_parallelism <= 64 or len(kf.sealed) < crypto.NONCE_LEN + crypto.TAG_LEN:
        raise FormatError("key file is malformed")
    params = crypto.KdfParams(kf.kdf_time, kf.kdf_memory_kib, kf.kdf_parallelism)
    kek = crypto.derive_kek(password, kf.salt, params)
    nonce = kf.sealed[: crypto.NONCE_LEN]
    try:
        plain = crypto.decrypt(kek, nonce, kf.sealed[crypto.NONCE_LEN :], KEY_AAD)
    except IntegrityError:
        return None
    return Secrets.from_bytes(plain)


def key_info(data: bytes) -> KeyFile:
    return KeyFile.from_bytes(data)
