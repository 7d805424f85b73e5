"""Creating and opening key files: the password unlocks the repository secrets via Argon2id.

Reading is defensive (docs/format.md §7): a key file is checked against its name and its Argon2id
parameters against fixed caps before any key derivation runs; key files are tried cheapest first;
a key file that cannot be used is named as damaged, never taken for a wrong password.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import os
import socket

from safehold import crypto
from safehold.backends.base import Backend
from safehold.errors import FormatError, IntegrityError, NotFound, UsageError, WrongPassword
from safehold.format.common import FORMAT_VERSION, unpack
from safehold.format.config import Config
from safehold.format.keyfile import MAX_KEY_FILE, KeyFile, Secrets
from safehold.ids import index_name, is_hex_id, name_to_id, storage_id
from safehold.repository.objects import Kind, open_object

KEY_AAD = b"safehold key v1"
_MAX_NAMED = 3
"""An error names at most this many damaged key files (and counts the rest)."""


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def make_key_file(secrets: Secrets, password: bytes, params: crypto.KdfParams) -> bytes:
    """A new key file wrapping ``secrets`` under ``password`` (UsageError for an empty password
    or parameters no reader accepts)."""
    if not password:
        raise UsageError("refusing an empty password: it would protect nothing")
    problem = params.problem()
    if problem is not None:
        raise UsageError(f"refusing to write a key file no reader accepts: {problem}")
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


def kdf_params(kf: KeyFile) -> crypto.KdfParams:
    return crypto.KdfParams(kf.kdf_time, kf.kdf_memory_kib, kf.kdf_parallelism)


def parse_key_file(data: bytes) -> KeyFile:
    """Parse a key file and check it against the documented bounds (FormatError if it is out of
    them), without deriving any key."""
    kf = KeyFile.from_bytes(data)
    problem = kdf_params(kf).problem()
    if problem is not None:
        raise FormatError(f"key file demands {problem}")
    if len(kf.salt) < crypto.KDF_MIN_SALT:
        raise FormatError("key file has a salt shorter than 8 bytes")
    if len(kf.sealed) < crypto.NONCE_LEN + crypto.TAG_LEN:
        raise FormatError("key file's data is truncated")
    return kf


def verify_key_file(name: str, data: bytes) -> str | None:
    """None if ``data`` is a well-formed key file that matches its name (``keys/<id>`` or the id),
    else what is wrong with it. Runs no key derivation."""
    if storage_id(data) != name_to_id(name):
        return "it does not match its name (corrupt or tampered)"
    try:
        parse_key_file(data)
    except FormatError as e:
        return str(e)
    return None


def try_key_file(data: bytes, password: bytes) -> Secrets | None:
    """The secrets of a key file if ``password`` opens it, else None. FormatError if the key file
    is malformed or out of bounds (no key derivation is run then)."""
    kf = parse_key_file(data)
    kek = crypto.derive_kek(password, kf.salt, kdf_params(kf))
    nonce = kf.sealed[: crypto.NONCE_LEN]
    try:
        plain = crypto.decrypt(kek, nonce, kf.sealed[crypto.NONCE_LEN :], KEY_AAD)
    except IntegrityError:
        return None
    return Secrets.from_bytes(plain)


def key_info(data: bytes) -> KeyFile:
    return KeyFile.from_bytes(data)


def _damage_text(damaged: dict[str, str]) -> str:
    items = sorted(damaged.items())
    text = "; ".join(f"key file {n} is damaged: {why}" for n, why in items[:_MAX_NAMED])
    if len(items) > _MAX_NAMED:
        text += f"; and {len(items) - _MAX_NAMED} more damaged key files"
    return text


def unlock(backend: Backend, password: bytes) -> tuple[Secrets, str, dict[str, str]]:
    """Open the repository's secrets with ``password``: (secrets, key id, damaged key files).

    Key files larger than :data:`MAX_KEY_FILE`, not matching their names, unparseable or beyond
    the Argon2id caps are damaged (name -> why) and never run the KDF; the others are tried in
    order of their KDF cost (passes x memory), then name, so a planted expensive key file cannot
    slow down an open with a cheaper one. If none opens: WrongPassword when no key file is
    damaged, else IntegrityError naming the damaged ones (the password may be theirs).
    """
    damaged: dict[str, str] = {}
    candidates: list[tuple[int, str, bytes]] = []
    for info in backend.list("keys/"):
        name = info.name
        if info.size > MAX_KEY_FILE:
            damaged[name] = f"it is larger than {MAX_KEY_FILE} bytes"
            continue
        try:
            data = backend.load(name)
        except NotFound:
            continue  # removed since it was listed
        why = verify_key_file(name, data)
        if why is not None:
            damaged[name] = why
            continue
        candidates.append((kdf_params(parse_key_file(data)).cost, name, data))
    candidates.sort(key=lambda c: (c[0], c[1]))
    for _, name, data in candidates:
        try:
            secrets = try_key_file(data, password)
        except FormatError as e:
            damaged[name] = f"its secrets are malformed: {e}"
            continue
        if secrets is not None:
            return secrets, name_to_id(name), damaged
    if damaged:
        tried = any(name not in damaged for _, name, _ in candidates)
        lead = "wrong password, and " if tried else "no key file of the repository can be used: "
        raise IntegrityError(lead + _damage_text(damaged))
    if not candidates:
        raise IntegrityError("the repository has no key files (keys/ is empty)")
    raise WrongPassword("wrong password: no key of the repository opens with it")


def with_config_copy(secrets: Secrets, config_plain: bytes) -> Secrets:
    """The secrets carrying ``config_plain`` as their config copy (written into key files made
    from them from now on)."""
    if secrets.config == config_plain:
        return secrets
    return dataclasses.replace(secrets, config=config_plain)


def config_from_copy(backend: Backend, secrets: Secrets, key_id: str, why: str) -> Config:
    """The config from the copy in the opened key's secrets, when the ``config`` object cannot
    be used (``why``). IntegrityError if there is no usable copy, or if the key cannot read any
    index object of the repository (a key of another repository must not lend its config)."""
    key = f"keys/{key_id}"
    if secrets.config is None:
        raise IntegrityError(
            f"{why}; key file {key} holds no copy of the config (made by an older safehold): "
            "open with another key, or restore the config from a backup"
        )
    try:
        config = Config.from_bytes(secrets.config)
    except FormatError as e:
        raise IntegrityError(f"{why}; the config copy in key file {key} is invalid: {e}") from None
    if config.repo_id != secrets.repo_id or config.public_key != secrets.public_key:
        raise IntegrityError(f"{why}; the config copy in key file {key} belongs to another key")
    indexes = sorted(
        (i for i in backend.list("index/") if is_hex_id(name_to_id(i.name))),
        key=lambda i: (i.size, i.name),
    )
    for info in indexes[:8]:
        try:
            data = backend.load(info.name)
            open_object(
                data,
                Kind.INDEX,
                meta_key=secrets.meta_key,
                private_key=None,
                what=index_name(name_to_id(info.name)),
            )
            return config
        except (IntegrityError, NotFound):
            continue
    if indexes:
        raise IntegrityError(
            f"{why}; key file {key} reads none of the repository's index objects, so its "
            "config copy is not used (a key of another repository?)"
        )
    return config


def readable_key_file(backend: Backend) -> str | None:
    """The name of a key file this safehold can read (well-formed, of our format version,
    matching its name; no key derivation is run), or None. When ``config``'s clear header claims
    a newer format version, this tells a newer repository (its key files are newer too: the
    "upgrade safehold" error stands) from a damaged header (docs/format.md §14.2)."""
    for info in backend.list("keys/"):
        if info.size > MAX_KEY_FILE or not is_hex_id(name_to_id(info.name)):
            continue
        try:
            data = backend.load(info.name)
        except NotFound:
            continue
        if verify_key_file(info.name, data) is None:
            return info.name
    return None


def newer_config(plain: bytes) -> int | None:
    """The format version an authenticated config plaintext claims, if newer than ours."""
    try:
        obj = unpack(plain, "repository config")
    except FormatError:
        return None
    v = obj.get("v") if isinstance(obj, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > FORMAT_VERSION else None
