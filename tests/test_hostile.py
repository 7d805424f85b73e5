"""A hostile repository (a stolen key, a malicious server or storage) cannot exhaust memory or
time, nor crash safehold with a traceback (issue 8).

Each case crafts its objects with the repository's secrets (opened with the library), then runs
the real CLI (``python -m safehold``) in a subprocess under an address-space limit, and checks
that the command completes or refuses within 512 MiB of peak RSS and 60 s, with a clear error.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from safehold import crypto
from safehold.backends.local import LocalBackend
from safehold.compress import Compression, compress, decompress
from safehold.errors import (
    FormatError,
    IntegrityError,
    UnsupportedVersion,
    UsageError,
    WrongPassword,
)
from safehold.format.common import pack as pack_obj
from safehold.format.config import Config, config_header
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.keyfile import KeyFile
from safehold.format.pack import (
    HEADER_NONCE,
    PACK_END_MAGIC,
    PACK_MAGIC,
    TRAILER,
    PackEntry,
    header_to_bytes,
    parse_trailer,
)
from safehold.ids import CONFIG_NAME, index_name, key_name, pack_name, storage_id
from safehold.repository.keys import make_key_file, try_key_file, verify_key_file
from safehold.repository.objects import (
    OBJECT_MAGIC,
    Kind,
    Mode,
    max_plaintext,
    meta_object,
    open_object,
)
from safehold.repository.repo import InitOptions, Repository
from tests.conftest import PASSWORD, Cli

PEAK_RSS = 512 << 20
SECONDS = 60
AS_LIMIT = 1536 << 20
"""A hard address-space limit, so that a regression fails the test instead of the machine."""

_WRAPPER = r"""
import resource, subprocess, sys
limit, out = int(sys.argv[1]), sys.argv[2]
def lim():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
p = subprocess.run(sys.argv[3:], preexec_fn=lim)
with open(out, "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(p.returncode)
"""


@dataclass
class Run:
    code: int
    out: str
    err: str
    peak: int  # bytes
    seconds: float

    def __str__(self) -> str:
        return (
            f"exit {self.code}, peak {self.peak >> 20} MiB, {self.seconds:.1f} s\n"
            f"--- stdout\n{self.out[-2000:]}\n--- stderr\n{self.err[-3000:]}"
        )


def bounded(cli: Cli, *args: str, env: dict[str, str] | None = None) -> Run:
    """Run ``safehold --repo REPO ARGS`` under the limits; assert the bounds and no traceback."""
    rss_file = cli.repo.parent / "maxrss"
    cmd = [sys.executable, "-c", _WRAPPER, str(AS_LIMIT), str(rss_file)]
    cmd += [sys.executable, "-m", "safehold", "--repo", str(cli.repo), *args]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        env=cli.env | {"MALLOC_ARENA_MAX": "2"} | (env or {}),
        capture_output=True,
        timeout=SECONDS + 30,
        check=False,
    )
    run = Run(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
        int(rss_file.read_text()) * 1024,
        time.monotonic() - t0,
    )
    assert run.seconds < SECONDS, str(run)
    assert run.peak < PEAK_RSS, str(run)
    for bad in ("Traceback", "internal error", "MemoryError"):
        assert bad not in run.err, str(run)
    return run


def refused(run: Run, code: int, *words: str) -> None:
    """The command failed with ``code`` and an error line (``safehold: ...``) naming ``words``."""
    assert run.code == code, str(run)
    errors = [x for x in run.err.splitlines() if x.startswith("safehold:")]
    assert errors, str(run)
    for w in words:
        assert any(w in x for x in errors), f"{w!r} not in the error\n{run}"


# --- crafting ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def zstd_bomb(size: int, content_size: bool) -> bytes:
    """A single zstd frame of ``size`` zero bytes (about 32 KiB per GiB)."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    co = c.compressobj(size=size if content_size else -1)
    zero = bytes(1 << 20)
    parts = [co.compress(zero) for _ in range(size >> 20)]
    parts.append(co.flush())
    return b"".join(parts)


def forge_pack(repo: Repository, entries: list[tuple[int, bytes, bytes, int, int]]) -> IndexedPack:
    """Store a pack holding blobs given as (type, id, payload, raw_length, codec), exactly as a
    writer with the repository's public key would; returns its index entry."""
    key = crypto.random_key()
    sealed = crypto.seal_key(repo.config.public_key, key)
    aead = crypto.Aead(key)
    body = bytearray(PACK_MAGIC + sealed)
    listed = []
    for i, (typ, bid, payload, raw_len, codec) in enumerate(entries):
        nonce = crypto.counter_nonce(i)
        blob = nonce + aead.encrypt(nonce, payload)
        listed.append(PackEntry(typ, bid, len(body), len(blob), raw_len, codec))
        body += blob
    header = aead.encrypt(HEADER_NONCE, header_to_bytes(listed))
    body += header + TRAILER.pack(len(header), PACK_END_MAGIC)
    pid = storage_id(bytes(body))
    repo.backend.store(pack_name(pid), bytes(body))
    return IndexedPack(bytes.fromhex(pid), len(body), sealed, listed)


def forge_meta(meta_key: bytes, kind: Kind, payload: bytes, codec: int = 1) -> bytes:
    """An envelope in meta mode whose encrypted payload is ``payload`` as given (a zstd frame
    for codec 1), authenticated with the repository's meta key."""
    salt = os.urandom(32)
    header = OBJECT_MAGIC + bytes([Mode.META, kind, codec, 0]) + salt
    key = crypto.meta_object_key(meta_key, salt)
    return header + crypto.encrypt(key, bytes(crypto.NONCE_LEN), payload, header)


def forge_sealed(public_key: bytes, kind: Kind, payload: bytes, codec: int = 1) -> bytes:
    data_key = crypto.random_key()
    header = OBJECT_MAGIC + bytes([Mode.SEALED, kind, codec, 0])
    header += crypto.seal_key(public_key, data_key)
    return header + crypto.encrypt(data_key, bytes(crypto.NONCE_LEN), payload, header)


def store_named(repo: Repository, prefix: str, data: bytes) -> str:
    oid = storage_id(data)
    repo.backend.store(f"{prefix}{oid}", data)
    return oid


def replace_index(repo: Repository, packs: list[IndexedPack]) -> None:
    """Make ``packs`` the whole index: one new index object, the others deleted."""
    old = repo.list_ids("index/")
    repo.store_index(IndexFile(packs, [bytes.fromhex(i) for i in old]))
    for iid in old:
        repo.backend.delete(index_name(iid))


def open_lib(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), PASSWORD.encode())


@pytest.fixture
def made(cli: Cli, tmp_path: Path) -> Path:
    """A repository with one snapshot of a small tree: ``f.txt`` (one chunk) and ``g.bin``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"small file that is one chunk\n" * 100)
    (src / "g.bin").write_bytes(os.urandom(50_000))
    cli.ok("init", repo=True)
    cli.ok("backup", str(src))
    return src


# --- zstd bombs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content_size", [True, False], ids=["declared", "undeclared"])
def test_zstd_bomb_blob_is_refused_by_restore_check_and_dump(
    cli: Cli, made: Path, tmp_path: Path, content_size: bool
) -> None:
    """A 64 KiB blob that expands to 2 GiB, listed with its file's true raw length: python-
    zstandard used to allocate the frame's declared size (2 GiB) whatever the limit. Every
    reader now stops at the declared length."""
    repo = open_lib(cli)
    snap = repo.find_snapshot("latest")
    root = repo.read_tree(snap.tree)
    # the tree of the snapshot path down to f.txt
    node = root[0]
    while node.type == "dir":
        assert node.subtree is not None
        nodes = repo.read_tree(node.subtree)
        named = {n.name: n for n in nodes}
        node = named.get(b"f.txt") or nodes[0]
    assert node.name == b"f.txt" and node.content is not None and len(node.content) == 1
    blob_id = node.content[0]
    loc = repo.index.lookup(blob_id)
    assert loc is not None
    others = [p for p in repo.index.packs() if p.pack_id != loc.pack_id]
    assert all(b.id != blob_id for p in others for b in p.blobs)
    # the pack again, its other blobs honest, f.txt's chunk a bomb
    (victim,) = [p for p in repo.index.packs() if p.pack_id == loc.pack_id]
    blobs = [(0, blob_id, zstd_bomb(2 << 30, content_size), node.size, 1)]
    for e in victim.blobs:
        if e.id != blob_id:
            plain = bytes(repo.read_blob(e.id))
            blobs.append((e.type, e.id, plain, len(plain), 0))
    forged = forge_pack(repo, blobs)
    replace_index(repo, [*others, forged])
    repo.backend.delete(pack_name(loc.pack_id.hex()))
    repo.close()

    run = bounded(cli, "check", "--read-data")
    assert run.code == 4, str(run)
    assert "f.txt" in run.out + run.err, str(run)
    run = bounded(cli, "restore", "latest", "--target", str(tmp_path / "out"))
    assert run.code != 0, str(run)
    assert "f.txt" in run.out + run.err, str(run)
    path = f"{made}/f.txt"
    run = bounded(cli, "dump", "latest", path)
    assert run.code != 0, str(run)
    assert run.out == "", str(run)


@pytest.mark.parametrize("kind", ["index", "snapshot"])
def test_zstd_bomb_index_or_snapshot_object(
    cli: Cli, made: Path, tmp_path: Path, kind: str
) -> None:
    """An index object (writable by any key holder) or a snapshot object whose payload is a
    64 KiB frame of 2 GiB: readers refuse to expand an object beyond its documented bound."""
    repo = open_lib(cli)
    bomb = zstd_bomb(2 << 30, True)
    if kind == "index":
        oid = store_named(repo, "index/", forge_meta(repo.secrets.meta_key, Kind.INDEX, bomb))
    else:
        data = forge_sealed(repo.config.public_key, Kind.SNAPSHOT, bomb)
        oid = store_named(repo, "snapshots/", data)
    repo.close()
    run = bounded(cli, "check")
    assert run.code == 4, str(run)
    assert oid[:8] in run.out + run.err and "allowed" in run.out + run.err, str(run)
    run = bounded(cli, "snapshots")
    assert run.code in (0, 1, 4), str(run)
    run = bounded(cli, "restore", "latest", "--target", str(tmp_path / "out"))
    assert run.code in (0, 1, 4), str(run)


# --- pack trailers ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["small", "sparse-5GiB"])
def test_trailer_claiming_a_huge_header(cli: Cli, made: Path, sparse: bool) -> None:
    """A trailer claiming a header of 0xFFFFFF00 bytes (no key needed to write it). In a small
    pack it is impossible; in a sparse 5 GiB file (cheap to plant) it used to make ``repair
    index`` read and decrypt 4 GiB (8.5 GB peak). Refused before loading, with the pack named."""
    names = sorted(i.name for i in LocalBackend(cli.repo).list("data/"))
    assert names
    for name in names:
        path = cli.repo / name
        with open(path, "r+b") as f:
            size = 5 << 30 if sparse else path.stat().st_size
            f.truncate(size)
            f.seek(size - TRAILER.size)
            f.write(TRAILER.pack(0xFFFFFF00, PACK_END_MAGIC))
    run = bounded(cli, "repair", "index")
    assert run.code != 0, str(run)
    for name in names:
        assert name.rsplit("/", 1)[1][:16] in run.err, str(run)
    assert "header" in run.err, str(run)


# --- config -------------------------------------------------------------------------------------

ABSURD = {
    "min > max": {"min": 1 << 20, "max": 1 << 12},
    "negative avg": {"avg": -5},
    "4 TiB max": {"max": 4 << 40},
    "avg outside min..max": {"avg": 1 << 12, "min": 1 << 16},
    "nc 9": {"nc": 9},
}
ABSURD_TOP = {
    "pack size 0": {"pack_size": 0},
    "pack size 4 TiB": {"pack_size": 4 << 40},
    "unknown compression": {"compression": "brotli"},
    "short repo id": {"repo_id": b"x"},
}


def _config_map(config: Config) -> dict[str, object]:
    return {
        "v": 1,
        "repo_id": config.repo_id,
        "chunker": {
            "algo": "fastcdc2020",
            "avg": config.chunk_avg,
            "min": config.chunk_min,
            "max": config.chunk_max,
            "nc": config.chunk_normalization,
        },
        "compression": config.compression,
        "pack_size": config.pack_size,
        "public_key": config.public_key,
        "created": config.created_ns,
    }


@pytest.mark.parametrize("case", [*ABSURD, *ABSURD_TOP])
def test_absurd_config_values_are_refused_with_a_clear_error(repo: Repository, case: str) -> None:
    obj = _config_map(repo.config)
    chunker = obj["chunker"]
    assert isinstance(chunker, dict)
    chunker.update(ABSURD.get(case, {}))
    obj.update(ABSURD_TOP.get(case, {}))
    with pytest.raises(IntegrityError) as e:
        Config.from_bytes(pack_obj(obj))
    text = str(e.value)
    assert text.startswith("repository config is invalid: ") and "\n" not in text, text


def _plant_config(repo: Repository, obj: dict[str, object]) -> None:
    body = meta_object(pack_obj(obj), Kind.CONFIG, meta_key=repo.secrets.meta_key)
    repo.backend.store(CONFIG_NAME, config_header() + body, overwrite=True)


def _old_style_key_only(repo: Repository) -> str:
    """Replace the repository's key files by one without the config copy (as older safehold
    wrote them); returns its name."""
    import dataclasses

    secrets = dataclasses.replace(repo.secrets, config=None)
    kf = make_key_file(secrets, PASSWORD.encode(), crypto.KdfParams(1, 1024, 1))
    name = key_name(store_named(repo, "keys/", kf).rsplit("/", 1)[-1])
    for info in list(repo.backend.list("keys/")):
        if info.name != name:
            repo.backend.delete(info.name)
    return name


def test_absurd_config_falls_back_to_the_key_files_copy(cli: Cli, made: Path) -> None:
    """An absurd (forged) config is damage: open uses the copy of the config kept in the key
    file, and says so; backup and restore still work. Without a copy (an older key file) the
    error names the config, exit 4."""
    repo = open_lib(cli)
    obj = _config_map(repo.config)
    obj["chunker"] = {
        "algo": "fastcdc2020",
        "avg": 1 << 20,
        "min": 1 << 24,
        "max": 1 << 12,
        "nc": 1,
    }
    _plant_config(repo, obj)
    again = open_lib(cli)
    assert again.config == repo.config
    assert again.config_damaged is not None and "chunker" in again.config_damaged
    again.close()
    bounded(cli, "snapshots")
    run = bounded(cli, "backup", str(made))
    assert run.code == 0, str(run)
    _old_style_key_only(repo)
    run = bounded(cli, "snapshots")
    refused(run, 4, "config", "chunker")
    repo.close()


# --- key files ----------------------------------------------------------------------------------


def _planted_key(t: int, m_kib: int, p: int) -> bytes:
    """A key file a hostile writer could plant: well-formed, matching its name, garbage data."""
    return KeyFile(
        kind="full",
        created="2026-01-01T00:00:00.000000Z",
        host="attacker",
        user="x",
        kdf_time=t,
        kdf_memory_kib=m_kib,
        kdf_parallelism=p,
        salt=os.urandom(16),
        sealed=os.urandom(200),
    ).to_bytes()


def test_planted_expensive_key_files_cost_nothing(cli: Cli, made: Path) -> None:
    """Key files demanding Argon2id 4 GiB x 100 passes are refused unread; one within the caps
    (1 GiB x 10) is tried after the cheaper real key, so every open stays fast. With a wrong
    password the refused one is named (it might have been the password's)."""
    repo = open_lib(cli)
    huge = store_named(repo, "keys/", _planted_key(100, 4 << 20, 4))
    store_named(repo, "keys/", _planted_key(10, 1 << 20, 1))
    # a name sorting before the real key's, so name order would have tried it first
    while True:
        data = _planted_key(10, 1 << 20, 1)
        if storage_id(data) < repo.key_id:
            store_named(repo, "keys/", data)
            break
    repo.close()
    run = bounded(cli, "snapshots")
    assert run.code == 0, str(run)
    assert run.seconds < 20, str(run)
    # a wrong password runs every key within the caps (1 GiB each): keep only the refused one
    for info in list(LocalBackend(cli.repo).list("keys/")):
        kf = json.loads((cli.repo / info.name).read_bytes())
        if kf["kdf"]["t"] == 10:
            (cli.repo / info.name).unlink()
    run = bounded(cli, "snapshots", env={"SAFEHOLD_PASSWORD": "not the password"})
    refused(run, 4, "wrong password", f"keys/{huge}", "Argon2id")


def test_damaged_only_key_is_named_not_wrong_password(cli: Cli, made: Path) -> None:
    keys = [i.name for i in LocalBackend(cli.repo).list("keys/")]
    assert len(keys) == 1
    path = cli.repo / keys[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    run = bounded(cli, "snapshots")
    refused(run, 4, keys[0], "damaged")


def test_damaged_key_beside_a_good_one(repo: Repository) -> None:
    """Two keys; the one for password B is damaged: password A opens (and the damage is
    recorded); password B names the damaged file instead of saying only "wrong password"."""
    other = repo.add_key(b"password B", crypto.KdfParams(1, 1024, 1))
    name = key_name(other)
    data = bytearray(repo.backend.load(name))
    data[-40] ^= 0x01
    repo.backend.store(name, bytes(data), overwrite=True)
    assert verify_key_file(name, bytes(data)) is not None
    opened = Repository.open(repo.backend, PASSWORD.encode())
    assert dict(opened.damaged_keys).keys() == {name}
    with pytest.raises(IntegrityError) as e:
        Repository.open(repo.backend, b"password B")
    assert not isinstance(e.value, WrongPassword)
    assert str(e.value).startswith("wrong password, and key file " + name), str(e.value)
    # no damage: a plain wrong password
    repo.backend.delete(name)
    with pytest.raises(WrongPassword):
        Repository.open(repo.backend, b"password C")


def test_verify_key_file(repo: Repository) -> None:
    name = key_name(repo.key_id)
    data = repo.backend.load(name)
    assert verify_key_file(name, data) is None
    assert verify_key_file(repo.key_id, data) is None
    assert "name" in (verify_key_file(key_name("ab" * 32), data) or "")
    expensive = _planted_key(11, 1024, 1)
    assert "time cost" in (verify_key_file(storage_id(expensive), expensive) or "")
    big = _planted_key(1, (1 << 20) + 1, 1)
    assert "memory" in (verify_key_file(storage_id(big), big) or "")
    bad = b"{" * 100_000
    assert "JSON" in (verify_key_file(storage_id(bad), bad) or "")


# --- the config copy ----------------------------------------------------------------------------


def _damage_config(repo_path: Path, damage: str) -> None:
    path = repo_path / "config"
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-20] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"nonsense")


@pytest.mark.parametrize("damage", ["flip", "delete", "garbage"])
def test_damaged_config_opens_with_the_copy(cli: Cli, made: Path, damage: str) -> None:
    """A flipped, deleted or garbage ``config``: the library opens with the copy in the key
    file and says why in ``config_damaged``; snapshots restore."""
    _damage_config(cli.repo, damage)
    repo = open_lib(cli)
    assert repo.config_damaged is not None
    assert repo.config_damaged.startswith("config"), repo.config_damaged
    latest = repo.find_snapshot("latest")
    assert latest.paths == [str(made)]
    repo.close()


@pytest.mark.parametrize(
    "damage",
    [
        "flip",
        "delete",
        "garbage",
    ],
)
def test_damaged_config_cli_restores(cli: Cli, made: Path, damage: str) -> None:
    _damage_config(cli.repo, damage)
    run = bounded(cli, "restore", "latest", "--target", str(cli.repo.parent / "out"))
    assert run.code == 0, str(run)
    got = cli.repo.parent / "out" / str(made).lstrip("/") / "f.txt"
    assert got.read_bytes() == (made / "f.txt").read_bytes()


def test_keys_added_later_keep_the_copy_and_old_keys_still_open(repo: Repository) -> None:
    plain = repo.secrets.config
    assert plain is not None and Config.from_bytes(plain) == repo.config
    old = _old_style_key_only(repo)
    opened = Repository.open(repo.backend, PASSWORD.encode())  # an old key still opens
    assert opened.key_id == old.rsplit("/", 1)[1] and opened.config_damaged is None
    new = opened.add_key(b"another", crypto.KdfParams(1, 1024, 1))
    secrets = try_key_file(opened.backend.load(key_name(new)), b"another")
    assert secrets is not None and secrets.config == plain
    # the config damaged, the old key has no copy: refused, naming the config and the key
    repo.backend.store(CONFIG_NAME, b"SAFEHOLD\x01\x00garbage", overwrite=True)
    with pytest.raises(IntegrityError) as e:
        Repository.open(repo.backend, PASSWORD.encode())
    assert "config" in str(e.value) and old in str(e.value), str(e.value)
    assert Repository.open(repo.backend, b"another").config == repo.config


def test_a_foreign_keys_copy_is_not_used(repo: Repository, tmp_path: Path) -> None:
    """A key file of another repository, same password, beside a damaged config: its copy would
    describe the other repository. It is refused because it reads none of the index objects."""
    from safehold.ops.backup import BackupOptions, backup

    src = tmp_path / "s"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1000))
    backup(repo, BackupOptions(paths=[str(src)]))
    other = Repository.init(
        LocalBackend(tmp_path / "other"),
        PASSWORD.encode(),
        InitOptions(kdf=crypto.KdfParams(1, 1024, 1)),
    )
    foreign = other.backend.load(key_name(other.key_id))
    for info in list(repo.backend.list("keys/")):
        repo.backend.delete(info.name)
    repo.backend.store(key_name(other.key_id), foreign)
    repo.backend.store(CONFIG_NAME, b"SAFEHOLD\x01\x00garbage", overwrite=True)
    with pytest.raises(IntegrityError) as e:
        Repository.open(repo.backend, PASSWORD.encode())
    assert "another repository" in str(e.value), str(e.value)


# --- init -----------------------------------------------------------------------------------


def test_init_refuses_an_empty_password(cli: Cli, tmp_path: Path) -> None:
    run = bounded(cli, "init", env={"SAFEHOLD_PASSWORD": ""})
    refused(run, 2, "empty password")
    assert not (cli.repo / "config").exists()
    assert not any((cli.repo / "keys").glob("*")) if (cli.repo / "keys").exists() else True
    with pytest.raises(UsageError):
        Repository.init(LocalBackend(tmp_path / "lib"), b"", InitOptions())


def test_no_key_file_with_an_empty_password(repo: Repository) -> None:
    with pytest.raises(UsageError):
        repo.add_key(b"", crypto.KdfParams(1, 1024, 1))
    with pytest.raises(UsageError):
        repo.change_password(b"", crypto.KdfParams(1, 1024, 1))
    assert [k.key_id for k in repo.list_keys()] == [repo.key_id]


# --- the bounds themselves (library level) --------------------------------------------------


def _peak(fn: object) -> tuple[object, int]:
    import tracemalloc

    assert callable(fn)
    tracemalloc.start()
    try:
        try:
            got = fn()
        except FormatError as e:
            got = e
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("content_size", [True, False])
def test_decompress_stops_at_the_declared_length(content_size: bool) -> None:
    bomb = zstd_bomb(2 << 30, content_size)
    got, peak = _peak(lambda: decompress(bomb, 1, 1000))
    assert isinstance(got, FormatError) and "1000" in str(got), got
    assert peak < 8 << 20
    got, peak = _peak(lambda: decompress(bomb, 1, 40 << 20))
    assert isinstance(got, FormatError), got
    assert peak < (40 << 20) + (16 << 20)


@pytest.mark.parametrize("level", [1, 3, 19, 22])
@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) + 1, 5 << 20, 17 << 20])
def test_honest_frames_decompress_within_the_window_bound(level: int, size: int) -> None:
    """The window bound derived from the declared length never refuses what a writer made."""
    data = (b"some text, " * (size // 11 + 1))[:size]
    if size > 1000:
        data = data[: size // 2] + os.urandom(size - size // 2)
    frame, codec = compress(data, Compression("zstd", level))
    if codec == 0:
        return
    assert bytes(decompress(frame, codec, len(data))) == data
    with pytest.raises(FormatError):
        decompress(frame, codec, len(data) - 1)


def test_truncated_frame_is_refused() -> None:
    data = os.urandom(1 << 16) * 4
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    with pytest.raises(FormatError, match="truncated"):
        decompress(frame[: len(frame) // 2], 1, len(data))


def test_object_limit_follows_its_stored_size() -> None:
    assert max_plaintext(Kind.INDEX, 1000) == 16 << 20
    assert max_plaintext(Kind.INDEX, 2 << 20) == 16 << 20
    assert max_plaintext(Kind.INDEX, 10 << 20) == 80 << 20
    assert max_plaintext(Kind.INDEX, 1 << 30) == 1 << 31
    assert max_plaintext(Kind.CONFIG, 1 << 30) == 1 << 16


@pytest.mark.parametrize(
    ("length", "size", "ok"),
    [
        (0xFFFFFF00, 98_000, False),
        (0xFFFFFF00, 5 << 30, False),
        ((1 << 30) + (1 << 20) + 1, 3 << 30, False),
        (1000, 1000 + 92, False),  # no blob area, yet a 1000-byte header
        (1000, 84 + 28 * 20 + 8 + 1000, True),
        (16, 84 + 8 + 16, True),
    ],
)
def test_trailer_bounds(length: int, size: int, ok: bool) -> None:
    tail = TRAILER.pack(length, PACK_END_MAGIC)
    if ok:
        assert parse_trailer(tail, size) == (size - 8 - length, length)
    else:
        with pytest.raises(FormatError, match="header"):
            parse_trailer(tail, size)


# --- planted index objects: bytes after the frame, padded frames (issue 8 follow-up) ------------


def _padded_bomb(pad: int, size: int) -> bytes:
    """One zstd frame without a declared size: ``pad`` random bytes (stored as raw blocks, so
    the frame itself is large) followed by ``size`` zero bytes."""
    co = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    parts = [co.compress(os.urandom(pad))]
    zero = bytes(1 << 20)
    parts += [co.compress(zero) for _ in range(size >> 20)]
    parts.append(co.flush())
    return b"".join(parts)


PLANTED = {
    # the outside tester's object: a small bomb frame, then 32 MiB of junk after it
    "junk": lambda: zstd_bomb(2 << 30, False) + os.urandom(32 << 20),
    # the same cost without junk: the frame's own first 32 MiB are incompressible
    "padded": lambda: _padded_bomb(32 << 20, 2 << 30),
}


@pytest.mark.parametrize("copies", [1, 4])
@pytest.mark.parametrize("shape", sorted(PLANTED))
def test_planted_index_object_cannot_lift_its_own_bound(
    cli: Cli, made: Path, tmp_path: Path, shape: str, copies: int
) -> None:
    """An index object needs only the meta key. Its payload's bound used to count bytes after
    the zstd frame, so 32 MiB of junk lifted it to 2 GiB (~2.1 GB peak per command, 8.5 GB for
    four objects on four threads). A payload is exactly one frame now, and a frame is bounded
    by its own size; every command stays within 512 MiB and names the object."""
    repo = open_lib(cli)
    payload = PLANTED[shape]()
    oids = [
        store_named(repo, "index/", forge_meta(repo.secrets.meta_key, Kind.INDEX, payload))
        for _ in range(copies)
    ]
    repo.close()
    run = bounded(cli, "check")
    assert run.code == 4, str(run)
    damage = [x for x in run.out.splitlines() if "index/" in x]
    assert len(damage) == copies and all(o in x for o, x in zip(sorted(oids), sorted(damage)))
    why = "after its zstd frame" if shape == "junk" else "bytes allowed"
    assert all(why in x for x in damage), str(run)
    for args in (("ls", "latest"), ("restore", "latest", "--target", str(tmp_path / "out"))):
        run = bounded(cli, *args)
        assert run.code in (0, 1, 4), str(run)
    out = tmp_path / "out" / str(made).lstrip("/")
    assert (out / "f.txt").read_bytes() == (made / "f.txt").read_bytes()


def test_bytes_after_the_frame_are_refused() -> None:
    data = b"index objects are mostly random ids " * 100
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    assert bytes(decompress(frame, 1, len(data))) == data
    for tail in (b"\x00", os.urandom(1000), frame):
        with pytest.raises(FormatError, match="after its zstd frame"):
            decompress(frame + tail, 1, 1 << 20, what="index/ab", bound="allowed")
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    with pytest.raises(FormatError, match="not a zstd frame"):
        decompress(skippable + frame, 1, 1 << 20)
    with pytest.raises(FormatError, match="truncated"):
        decompress(frame[:-1], 1, len(data))


@pytest.mark.parametrize("shape", sorted(PLANTED))
def test_planted_payload_costs_little_memory(shape: str) -> None:
    """The refusal happens before (junk) or while (padded) decompressing, and in both cases
    without holding more than a few MiB of output."""
    meta_key = os.urandom(32)
    data = forge_meta(meta_key, Kind.INDEX, PLANTED[shape]())
    got, peak = _peak(
        lambda: open_object(data, Kind.INDEX, meta_key=meta_key, private_key=None, what="index/x")
    )
    assert isinstance(got, FormatError) and "index/x" in str(got), got
    assert peak < len(data) + (16 << 20), peak >> 20


def test_undeclared_frame_within_its_bound_is_read_exactly() -> None:
    data = os.urandom(3 << 20) + bytes(5 << 20)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert zstandard.frame_content_size(frame) == -1
    got, peak = _peak(lambda: decompress(frame, 1, len(data)))
    assert isinstance(got, bytes | memoryview) and bytes(got) == data
    assert peak < len(data) + (8 << 20), peak >> 20
    with pytest.raises(FormatError, match="more than"):
        decompress(frame, 1, len(data) - 1)


# --- a damaged version in config's clear header (issue 8 follow-up) -----------------------------


@pytest.mark.parametrize("offset", [8, 9])
def test_flipped_config_version_opens_with_the_copy(cli: Cli, made: Path, offset: int) -> None:
    """One flipped bit in the clear version field used to lock the repository for good: every
    command, ``repair config`` included, said "upgrade safehold". The key files are of version
    1 and hold an authenticated copy of the config: open with it, say so, repair writes it
    back."""
    path = cli.repo / "config"
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    repo = open_lib(cli)
    assert repo.config_damaged is not None and "format version" in repo.config_damaged
    assert repo.config_damaged.startswith("config"), repo.config_damaged
    assert repo.find_snapshot("latest").paths == [str(made)]
    repo.close()
    run = bounded(cli, "snapshots")
    assert run.code == 0 and "format version" in run.err, str(run)
    run = bounded(cli, "check")
    refused(run, 4, "config")
    run = bounded(cli, "repair", "config")
    assert run.code == 0, str(run)
    assert path.read_bytes()[8:10] == b"\x01\x00"
    run = bounded(cli, "check")
    assert run.code == 0, str(run)
    assert "format version" not in run.err, str(run)


def _rewrite_key_files(repo_path: Path, version: int) -> None:
    """Every key file's clear JSON claiming ``version`` (and renamed after its new content)."""
    for path in sorted((repo_path / "keys").iterdir()):
        obj = json.loads(path.read_bytes())
        obj["v"] = version
        data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
        path.unlink()
        (repo_path / "keys" / storage_id(data)).write_bytes(data)


def _set_config_version(repo_path: Path, version: int) -> None:
    path = repo_path / "config"
    data = path.read_bytes()
    path.write_bytes(data[:8] + version.to_bytes(2, "little") + data[10:])


def test_a_newer_repository_still_says_upgrade(cli: Cli, made: Path) -> None:
    """Config and key files of a newer version: the clear "upgrade safehold" error as before,
    before any password is asked for."""
    _set_config_version(cli.repo, 2)
    _rewrite_key_files(cli.repo, 2)
    for env in (None, {"SAFEHOLD_PASSWORD": ""}):
        run = bounded(cli, "snapshots", env=env)
        refused(run, 2, "format version 2", "upgrade safehold")
    for args in (("repair", "config"), ("check",)):
        refused(bounded(cli, *args), 2, "upgrade safehold")
    with pytest.raises(UnsupportedVersion):
        open_lib(cli)


def test_a_newer_config_body_still_says_upgrade(cli: Cli, made: Path) -> None:
    """Key files of version 1 but a config whose *authenticated* content is of a newer version:
    the repository is newer (its key files were kept), not damaged; the copy is not used."""
    repo = open_lib(cli)
    obj = _config_map(repo.config) | {"v": 2}
    body = meta_object(pack_obj(obj), Kind.CONFIG, meta_key=repo.secrets.meta_key)
    repo.backend.store(CONFIG_NAME, config_header()[:8] + b"\x02\x00" + body, overwrite=True)
    repo.close()
    with pytest.raises(UnsupportedVersion, match="upgrade safehold"):
        open_lib(cli)
    refused(bounded(cli, "snapshots"), 2, "upgrade safehold")


def test_a_frame_lying_about_a_large_size_allocates_nothing_like_it() -> None:
    """A tree blob may claim up to 1 GiB: a frame declaring 100 MiB that holds 70 KB is counted
    out as a stream before any buffer of its declared size is made."""
    data = os.urandom(70_000)
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(data))
    at = zstandard.frame_header_size(bytes(frame))
    assert frame[4] >> 6 == 2  # a 4-byte content size field, just before the blocks
    frame[at - 4 : at] = (100 << 20).to_bytes(4, "little")
    got, peak = _peak(lambda: decompress(bytes(frame), 1, 200 << 20))
    assert isinstance(got, FormatError) and str(got).startswith("blob"), got
    assert peak < 16 << 20, peak >> 20


def test_a_flood_of_empty_containers_is_refused_before_it_costs_much() -> None:
    """8 MiB of empty msgpack arrays held ~610 MB (an uncompressed index object needs only the
    meta key): a parser now allows one array or map per 16 bytes of encoding."""
    import resource

    from safehold.format.common import unpack

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flat = b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x90" * 8_000_000
    nested = b"\xdd" + (500_000).to_bytes(4, "big") + (b"\x9f" + b"\x90" * 15) * 500_000
    for bomb in (flat, nested):
        with pytest.raises(FormatError, match="arrays and maps"):
            unpack(bomb, "index")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 128 << 10, grown_kib
