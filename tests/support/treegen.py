#!/usr/bin/env python3
"""Deterministic generator of realistic file trees for tests and benchmarks (stdlib only).

Create a tree (OUT must not exist or be empty)::

    python tests/support/treegen.py OUT --size-mb N [--seed S]

Apply the deterministic change set of ``mutate_tree`` to an existing tree::

    python tests/support/treegen.py OUT --mutate [--seed S]

From Python: ``make_tree(root, size_bytes, seed=1)`` and ``mutate_tree(root, seed=2)``.

The same seed and size always give the same names, bytes, modes, symlink targets,
hardlink groups, sparse layout and (nanosecond) mtimes of files, directories and
symlinks; only inode numbers and ctimes differ. Modes are set explicitly, so the
process umask does not matter. One exception: the "absolute" symlink points inside
the tree, so its target contains the tree's own absolute path (generate into the same
path to get byte-identical trees).

What a tree holds, scaled to ``size_bytes`` (apparent bytes of regular files, the
holes of the sparse files not counted) with about 30 files per MiB; every feature is
present down to 2 MiB:

* many small text-like files (16 B .. 64 KiB, a few larger): source projects with
  ``.git`` objects (zlib, incompressible), documents, a Maildir, dotfiles, ``.config``,
  ``.local/share``; random ``.cache`` blobs;
* exact duplicates: the same LICENSE in every project, a vendored library copied into
  two projects, an "old laptop" copy of some documents, re-imported photos;
* medium files (64 KiB .. 8 MiB): photos / music / zip (random bytes), pdf (mixed),
  logs, csv, sqlite-like page files (compressible);
* three large random binaries (~20 %) and a VM image (~25 %) with zero runs, random
  runs, text runs and 4 KiB-aligned copies of its own earlier regions and of a photo;
* two sparse files: one with real bytes at the start, middle and end around large holes,
  one that ends in a hole (holes never smaller than 3 MiB);
* an empty file, empty directories, a ``.ssh`` directory with mode 0o700;
* symlinks: relative (to a file and to a directory), absolute (to a file inside the
  tree), dangling, and a pair that loops;
* hardlinks: a group of three names and a group of two;
* a 24-level deep directory chain, a 240-byte name, unicode names (NFC/NFD twins, CJK,
  RTL, emoji) and one name that is not valid UTF-8 (``b"latin1-caf\\xe9.txt"``);
* modes 0o644, 0o600, 0o755, 0o444, 0o700 and mtimes with nanosecond precision.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import random
import stat
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

__all__ = ["GENERATOR_VERSION", "make_tree", "mutate_tree", "tree_stats"]

#: Bumped whenever the generated content changes (benchmarks key their corpus cache on it).
GENERATOR_VERSION = 1

KiB = 1 << 10
MiB = 1 << 20
_NS = 1_000_000_000
BASE_NS = 1_609_459_200 * _NS  # 2021-01-01T00:00:00Z
SPAN_NS = 3 * 365 * 86_400 * _NS
MUTATE_NS = 1_717_200_000 * _NS  # 2024-06-01
_DAY_NS = 86_400 * _NS
_PIECE = 16 * MiB  # random bytes are generated and written in pieces of this size
_DEEP_LEVELS = 24
_VIDEO = "Videos/holiday 2023.mp4"

T = TypeVar("T")


# --------------------------------------------------------------------------- randomness
def _seed_of(*key: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")


class Rng(random.Random):
    """A ``random.Random`` seeded from an arbitrary key tuple, with a few helpers."""

    def __init__(self, *key: object) -> None:
        super().__init__(_seed_of(*key))

    def logsize(self, lo_exp: int, hi_exp: int) -> int:
        """Piecewise log-uniform integer in [2**lo_exp, 2**hi_exp)."""
        e = self.randint(lo_exp, hi_exp - 1)
        return self.randint(1 << e, (1 << (e + 1)) - 1)

    def hexs(self, n: int) -> str:
        return self.randbytes((n + 1) // 2).hex()[:n]

    def mtime_ns(self, base: int = BASE_NS, span: int = SPAN_NS) -> int:
        return base + self.randrange(span)

    def weighted(self, items: Sequence[tuple[T, float]]) -> T:
        return self.choices([v for v, _ in items], [w for _, w in items])[0]


def random_bytes(n: int, *key: object) -> bytes:
    """``n`` incompressible bytes, a pure function of ``key`` (independent of call order)."""
    return b"".join(random_pieces(n, *key))


def random_pieces(n: int, *key: object) -> Iterator[bytes]:
    i = 0
    while n > 0:
        m = min(n, _PIECE)
        yield random.Random(_seed_of(*key, i)).randbytes(m)
        n -= m
        i += 1


# --------------------------------------------------------------------------- text pools
def _split(text: str) -> list[str]:
    return text.split()


_COMMON = _split(
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no what out up said about into than them can only other time new some could these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three data file system backup "
    "server client user value error result list table index report note meeting project budget"
)
_SYLLABLES = _split(
    "ka ri to na mo lu shi en ar ex vo pi qu zel tor man dra fi ol un ba ce de ge ho ja ki le "
    "mi no pa ro sa te vi wu xa yo ze an ber cor dal fen gul hal ist jor kel lim nor ost pal "
    "qin rus sol tum urk vel wyn"
)
_UNI_WORDS = _split(
    "über naïve café Straße smörgåsbord façade déjà-vu 日本語 データ 文档 笔记 Москва отчёт "
    "Ελληνικά 한국어 עברית العربية हिन्दी ไทย Ωmega ﬁle 🎉 😀"
)
_UNICODE_NAMES = (
    "Résumé — final.txt",
    "naïve café notes.md",
    "日本語のファイル.txt",
    "中文文档.md",
    "Москва-2023.txt",
    "Ελληνικά.txt",
    "עברית.txt",
    "العربية.txt",
    "한국어 메모.txt",
    "emoji 🎉🚀 party.txt",
    "caf\u00e9 nfc.txt",
    "cafe\u0301 nfd.txt",  # the NFD twin of the name above
    "name with 'quotes' and \"dq\".txt",
    "-leading-dash.txt",
    "trailing space .txt",
    "back\\slash.txt",
    "tab\there.txt",
    "new\nline.txt",
    "UPPER.TXT",
    "upper.txt",
)
NON_UTF8_NAME = b"latin1-caf\xe9.txt"

Pool = tuple[bytes, list[int]]


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    r = Rng("treegen-words")
    out = list(_COMMON)
    for _ in range(3000):
        out.append("".join(r.choices(_SYLLABLES, k=r.randint(1, 3))))
    return tuple(out)


@lru_cache(maxsize=1)
def _pools() -> dict[str, Pool]:
    """About 1 MiB of lines per kind of text; files are built from slices of these."""
    r = Rng("treegen-pools")
    words = _words()
    rint = r.randrange

    def w() -> str:
        return words[rint(len(words))]

    def ident() -> str:
        k = rint(3)
        return w() if k == 0 else f"{w()}_{w()}" if k == 1 else w() + w().capitalize()

    def sentence(lo: int = 5, hi: int = 16) -> str:
        s = " ".join(r.choices(words, k=r.randint(lo, hi)))
        if rint(30) == 0:
            s += " " + r.choice(_UNI_WORDS)
        return s[:1].upper() + s[1:] + "."

    code: list[Callable[[], str]] = [
        lambda: f"def {ident()}({ident()}, {ident()}):",
        lambda: f"    {ident()} = {ident()}({ident()}, {rint(1000)})",
        lambda: f"    if {ident()} is None:",
        lambda: f"        return {ident()}",
        lambda: f"class {ident().capitalize()}({ident().capitalize()}):",
        lambda: f"    # {sentence()}",
        lambda: f"import {w()}",
        lambda: f"from {w()}.{w()} import {ident()}",
        lambda: "",
        lambda: f"    for {w()} in range({rint(100)}):",
        lambda: f"        {ident()}.append({ident()}[{rint(64)}])",
        lambda: f'    raise ValueError("{sentence(3, 8)}")',
        lambda: f"        self.{ident()} = {ident()}",
        lambda: f'    return {{"{w()}": {ident()}, "{w()}": {rint(10**6)}}}',
        lambda: f'    log.info("{sentence(3, 7)} %s", {ident()})',
    ]
    config: list[Callable[[], str]] = [
        lambda: f"[{ident()}]",
        lambda: f"{ident()} = {rint(100000)}",
        lambda: f'{ident()} = "{w()}"',
        lambda: f"  {ident()}: {ident()}",
        lambda: f'  "{ident()}": {r.choice(("true", "false", "null", str(rint(999))))},',
        lambda: f"# {sentence(3, 10)}",
        lambda: f"{w()}.{w()}=0x{rint(2**32):08x}",
        lambda: "",
    ]
    levels = ("INFO ", "DEBUG", "WARN ", "ERROR", "INFO ", "INFO ")
    log: list[Callable[[], str]] = [
        lambda: (
            f"2023-{1 + rint(12):02d}-{1 + rint(28):02d}T{rint(24):02d}:{rint(60):02d}:"
            f"{rint(60):02d}.{rint(1000):03d}Z {r.choice(levels)} [{w()}] {sentence(4, 12)} "
            f"id={rint(2**32):08x} took={rint(5000)}ms"
        ),
        lambda: (
            f"2023-{1 + rint(12):02d}-{1 + rint(28):02d}T{rint(24):02d}:{rint(60):02d}:"
            f"{rint(60):02d}Z {r.choice(levels)} {r.choice(('GET', 'POST', 'PUT'))} "
            f"/{w()}/{w()}?{w()}={rint(10**5)} {r.choice((200, 200, 200, 404, 500))}"
        ),
    ]

    def prose() -> str:
        k = r.random()
        if k < 0.05:
            return "#" * r.randint(1, 3) + " " + sentence(2, 6)
        if k < 0.15:
            return ""
        if k < 0.22:
            return "- " + sentence(3, 9)
        return " ".join(sentence() for _ in range(r.randint(1, 4)))

    def csv() -> str:
        return (
            f"{rint(10**6)},{rint(10**6)},{rint(100)}.{rint(100):02d},{w()},"
            f"2023-{1 + rint(12):02d}-{1 + rint(28):02d}"
        )

    gens: dict[str, Callable[[], str]] = {
        "code": lambda: r.choice(code)(),
        "config": lambda: r.choice(config)(),
        "log": lambda: r.choice(log)(),
        "prose": prose,
        "csv": csv,
    }
    pools: dict[str, Pool] = {}
    for kind, gen in gens.items():
        lines: list[bytes] = []
        starts = [0]
        total = 0
        while total < MiB:
            ln = (gen() + "\n").encode()
            lines.append(ln)
            total += len(ln)
            starts.append(total)
        pools[kind] = (b"".join(lines), starts)
    return pools


_COMMENT = {"code": "# ", "config": "# ", "log": "", "prose": "", "csv": ""}


def text_blob(kind: str, size: int, rng: Rng, tag: object) -> bytes:
    """About ``size`` bytes of ``kind`` text: slices of the line pool and unique lines."""
    blob, starts = _pools()[kind]
    nlines = len(starts) - 1
    parts: list[bytes] = []
    got = 0
    prefix = _COMMENT[kind]
    while got < size:
        seg = min(size - got, rng.randint(512, 16 * KiB))
        i = rng.randrange(nlines)
        j = min(bisect.bisect_left(starts, starts[i] + seg, lo=i), nlines)
        piece = blob[starts[i] : starts[j]]
        uniq = f"{prefix}{tag} {rng.hexs(12)} {got}\n".encode()
        parts.append(piece)
        parts.append(uniq)
        got += len(piece) + len(uniq)
    return b"".join(parts)[:size]


# --------------------------------------------------------------------------- writer
class _Writer:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = str(root)
        self.seed = seed
        self.dirs: dict[str, int] = {}  # relative dir -> mode, every directory made
        self.nfiles = 0
        self.nbytes = 0  # apparent bytes, holes of sparse files excluded
        self.t = Rng(seed, "mtimes")

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        if not rel or rel in self.dirs:
            return
        self.mkdir(os.path.dirname(rel))
        p = self.path(rel)
        os.mkdir(p)
        os.chmod(p, mode)
        self.dirs[rel] = mode

    def file(
        self,
        rel: str,
        data: bytes | Iterable[bytes],
        mode: int = 0o644,
        mtime_ns: int | None = None,
    ) -> None:
        self.mkdir(os.path.dirname(rel))
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for piece in [data] if isinstance(data, bytes) else data:
                _write_all(fd, piece)
                self.nbytes += len(piece)
            os.fchmod(fd, mode)
            t = self.t.mtime_ns() if mtime_ns is None else mtime_ns
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)
        self.nfiles += 1

    def symlink(self, target: str, rel: str) -> None:
        self.mkdir(os.path.dirname(rel))
        os.symlink(target, self.path(rel))
        t = self.t.mtime_ns()
        os.utime(self.path(rel), ns=(t, t), follow_symlinks=False)

    def link(self, existing: str, rel: str) -> None:
        self.mkdir(os.path.dirname(rel))
        os.link(self.path(existing), self.path(rel))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _nested_dirs(rng: Rng, base: str, n: int, max_depth: int, name: Callable[[], str]) -> list[str]:
    dirs = [base]
    depth = {base: 0}
    for _ in range(n):
        parent = rng.choice(dirs)
        if depth[parent] >= max_depth:
            parent = base
        d = f"{parent}/{name()}"
        if d not in depth:
            dirs.append(d)
            depth[d] = depth[parent] + 1
    return dirs


# --------------------------------------------------------------------------- make_tree
def make_tree(root: Path, size_bytes: int, seed: int = 1) -> None:
    """Generate a deterministic, realistic tree of about ``size_bytes`` bytes under ``root``.

    ``root`` is created if needed and must be empty; its mode is set to 0o755.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    os.chmod(root, 0o755)
    total = max(int(size_bytes), 1 * MiB)
    mib = total / MiB
    W = _Writer(root, seed)
    rng = Rng(seed, "layout")
    words = _words()

    def name() -> str:
        return rng.choice(words)

    def ident() -> str:
        return f"{name()}_{name()}" if rng.random() < 0.5 else name()

    big_small = total >= 64 * MiB  # a few 64-512 KiB "small" files only in larger trees

    def small_size(r: Rng = rng) -> int:
        if big_small and r.random() < 0.02:
            return r.logsize(16, 19)
        return r.logsize(4, 16)

    n_small = max(50, round(mib * 26))
    license_text = text_blob("prose", 1100, Rng(seed, "license"), "LICENSE")

    # -- projects (~50 % of the small files) ---------------------------------------
    n_proj = max(2, min(40, int(mib) // 32))
    per_proj = max(12, n_small // 2 // n_proj)
    exts = [(".py", 5.0), (".js", 2.0), (".c", 1.0), (".h", 1.0), (".go", 1.0), (".rs", 1.0)]
    exts += [(".json", 1.0), (".md", 1.0), (".toml", 0.3)]
    projects: list[str] = []
    for p in range(n_proj):
        pname = f"{name()}-{name()}"
        while pname in projects:
            pname += "x"
        projects.append(pname)
        base = f"Projects/{pname}"
        header = text_blob("code", rng.randint(200, 700), Rng(seed, "hdr", p), "copyright")
        W.file(f"{base}/LICENSE", license_text)
        W.file(f"{base}/README.md", text_blob("prose", rng.randint(500, 6000), rng, pname))
        W.file(f"{base}/.gitignore", b"__pycache__/\n*.pyc\nbuild/\ndist/\n.venv/\n")
        run_sh = f'#!/bin/sh\nset -e\nexec python3 -m {pname} "$@"\n'.encode()
        W.file(f"{base}/scripts/run.sh", run_sh, mode=0o755)
        W.file(f"{base}/.git/HEAD", b"ref: refs/heads/main\n")
        W.file(f"{base}/.git/refs/heads/main", (rng.hexs(40) + "\n").encode())
        pkg = f"{base}/src/{pname.replace('-', '_')}"
        src = _nested_dirs(rng, pkg, max(3, per_proj // 25), 6, name)
        tests = _nested_dirs(rng, f"{base}/tests", max(1, per_proj // 150), 2, name)
        for d in src:
            W.file(f"{d}/__init__.py", b"")
        for i in range(max(4, per_proj - len(src) - 6)):
            k = rng.random()
            if k < 0.15 or i == 0:  # a git object: zlib-compressed text, read-only
                h = rng.hexs(40)
                body = text_blob("code", small_size(), rng, h)
                data = zlib.compress(b"blob %d\0" % len(body) + body, 1)
                W.file(f"{base}/.git/objects/{h[:2]}/{h[2:]}", data, mode=0o444)
            elif k < 0.80:
                rel = f"{rng.choice(src)}/{ident()}_{i}{rng.weighted(exts)}"
                W.file(rel, header + text_blob("code", small_size(), rng, i))
            elif k < 0.93:
                rel = f"{rng.choice(tests)}/test_{ident()}_{i}.py"
                W.file(rel, header + text_blob("code", small_size(), rng, i))
            else:
                W.file(f"{base}/docs/{name()}_{i}.md", text_blob("prose", small_size(), rng, i))
    # a vendored library: the same files (and mtimes) in two projects
    vr = Rng(seed, "vendor")
    vendored = [
        (
            f"lib/{vr.choice(words)}/{vr.choice(words)}_{i}.py",
            text_blob("code", small_size(vr), vr, i),
        )
        for i in range(max(4, n_small // 50))
    ]
    for proj in projects[:2]:
        for rel, data in vendored:
            W.file(f"Projects/{proj}/vendor/fastjson/{rel}", data, mtime_ns=BASE_NS)
    # deep nesting, node_modules style
    deep = f"Projects/{projects[0]}/node_modules"
    for lvl in range(_DEEP_LEVELS):
        deep += f"/pkg-{words[(lvl * 7) % len(words)]}/node_modules"
        if lvl % 6 == 5:
            W.file(f"{deep}/index.js", text_blob("code", 300 + lvl, rng, lvl))
    W.file(f"{deep}/deepest.txt", b"bottom of a deep tree\n")
    W.file(f"Projects/{projects[0]}/{('long-name-' + 'x' * 240)[:236]}.txt", b"a 240-byte name\n")

    # -- documents (~15 %) ------------------------------------------------------------
    doc_dirs = [
        f"Documents/{y}/{name()}" for y in range(2018, 2025) for _ in range(rng.randint(1, 4))
    ]
    doc_dirs += ["Documents/Документы", "Documents/写真 メモ", "Documents/Rechnungen/Straße"]
    docs: list[tuple[str, bytes]] = []
    doc_kinds = [(("prose", ".md"), 4.0), (("prose", ".txt"), 3.0), (("config", ".json"), 1.0)]
    doc_kinds.append((("log", ".log"), 1.0))
    for i in range(max(8, int(n_small * 0.15))):
        kind, ext = rng.weighted(doc_kinds)
        if rng.random() < 0.05:
            rel = f"{rng.choice(doc_dirs)}/{rng.choice(_UNI_WORDS)} {name()} {i}{ext}"
        else:
            rel = f"{rng.choice(doc_dirs)}/{name()}_{name()}_{i}{ext}"
        data = text_blob(kind, small_size(), rng, i)
        W.file(rel, data)
        docs.append((rel, data))
    for nm in _UNICODE_NAMES:
        W.file(f"Documents/unicode/{nm}", f"unicode name test: {nm}\n".encode())
    # a name that is not valid UTF-8, created through a bytes path
    bpath = os.fsencode(W.path("Documents/unicode")) + b"/" + NON_UTF8_NAME
    fd = os.open(bpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _write_all(fd, b"this name is not valid UTF-8\n")
    os.fchmod(fd, 0o644)
    t = W.t.mtime_ns()
    os.utime(fd, ns=(t, t))
    os.close(fd)
    W.nfiles += 1
    # an "old laptop backup": exact copies of some documents under another path
    for j in rng.sample(range(len(docs)), max(3, len(docs) // 30)):
        rel, data = docs[j]
        W.file("Documents/Backup of old laptop/" + rel.split("/", 1)[1], data)

    # -- mail (~5 %) ------------------------------------------------------------------
    folders = ["INBOX", "Sent", "Archive/2022", "Archive/2023", "Lists/dev"]
    for i in range(max(3, int(n_small * 0.05))):
        hdr = (
            f"From: {name()} <{name()}@example.org>\nTo: me@example.org\n"
            f"Subject: {name()} {name()} {name()}\nMessage-ID: <{rng.hexs(16)}@mail>\n"
            "Content-Type: text/plain; charset=utf-8\n\n"
        ).encode()
        rel = f"Mail/{rng.choice(folders)}/cur/{1600000000 + rng.randrange(10**8)}.{i}.host:2,S"
        W.file(rel, hdr + text_blob("prose", small_size(), rng, i), mode=0o600)
    for f in folders:
        W.mkdir(f"Mail/{f}/new", 0o700)
        W.mkdir(f"Mail/{f}/tmp", 0o700)

    # -- .config, dotfiles, .ssh (~8 %) ---------------------------------------------
    apps = [name() for _ in range(max(3, n_small // 600))]
    cexts = [".conf", ".json", ".ini", ".yaml", ".toml", "rc"]
    for i in range(max(4, int(n_small * 0.08))):
        a = rng.choice(apps)
        if rng.random() < 0.7:
            rel = f".config/{a}/{name()}_{i}{rng.choice(cexts)}"
        else:
            rel = f".config/{a}/{name()}/{name()}_{i}{rng.choice(cexts)}"
        W.file(rel, text_blob("config", small_size(), rng, i))
    for df in (".bashrc", ".profile", ".gitconfig", ".vimrc", ".tmux.conf"):
        W.file(df, text_blob("config", rng.randint(200, 5000), rng, df))
    W.file(".bash_history", text_blob("code", min(150 * KiB, total // 64), rng, "hist"), mode=0o600)
    W.mkdir(".ssh", 0o700)
    W.file(".ssh/config", b"Host *\n  ServerAliveInterval 30\n", mode=0o600)
    key = random_bytes(300, seed, "ssh-key").hex().encode()
    pem = b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + key + b"\n-----END OPENSSH PRIVATE KEY-----\n"
    W.file(".ssh/id_ed25519", pem, mode=0o600)
    pub = b"ssh-ed25519 " + random_bytes(32, seed, "ssh-pub").hex().encode() + b" me@host\n"
    W.file(".ssh/id_ed25519.pub", pub)

    # -- .local/share (~7 %) ----------------------------------------------------------
    lapps = [name() for _ in range(4)]
    for i in range(max(3, int(n_small * 0.07))):
        ext = rng.choice(["json", "xml", "txt", "db-journal"])
        rel = f".local/share/{rng.choice(lapps)}/{name()}/{name()}_{i}.{ext}"
        W.file(rel, text_blob(rng.choice(["config", "prose", "log"]), small_size(), rng, i))

    # -- .cache (~15 %): random blobs in fan-out directories ------------------------
    for i in range(max(4, int(n_small * 0.15))):
        h = rng.hexs(40)
        if rng.random() < 0.5:
            rel = f".cache/pip/http/{h[0]}/{h[1:3]}/{h}"
        else:
            rel = f".cache/{rng.choice(['thumbnails/normal', 'fontconfig', 'browser/entries'])}/{h}"
        W.file(rel, random_bytes(small_size() // 2 + 1, seed, "cache", i))

    # -- empty files and directories -------------------------------------------------
    W.file("Documents/empty.txt", b"")
    empties = {"Documents/empty.txt"}
    for _ in range(max(2, n_small // 100)):
        d = rng.choice(doc_dirs + [f".config/{a}" for a in apps])
        rel = f"{d}/{rng.choice(['.gitkeep', '.lock', '__init__.py'])}"
        if rel not in empties:
            empties.add(rel)
            W.file(rel, b"")
    for d in ("Downloads/empty-dir", f"Projects/{projects[-1]}/build", "Templates", "Public/a/b/c"):
        W.mkdir(d)

    # -- budgets for the rest -------------------------------------------------------
    large_budget = int(total * 0.20)
    vm_size = max(256 * KiB, int(total * 0.25) // (4 * KiB) * 4 * KiB)
    sparse_data = 160 * KiB + 16 * KiB
    med_budget = total - W.nbytes - large_budget - vm_size - sparse_data

    # -- medium files ------------------------------------------------------------------
    rm = Rng(seed, "medium")
    first_photo = b""  # the VM image holds a copy of it
    used = 0
    i = 0
    kinds = [("jpg", 30.0), ("mp3", 10.0), ("zip", 8.0), ("pdf", 14.0), ("log", 16.0)]
    kinds += [("csv", 10.0), ("sqlite", 6.0)]
    while used < med_budget or i < 4:
        i += 1
        kind = "jpg" if i <= 2 else rm.weighted(kinds)
        size = max(64 * KiB, min(rm.logsize(16, 23), med_budget // 4, med_budget - used))
        if kind == "jpg":
            data = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + random_bytes(size, seed, "jpg", i)
            rel = f"Pictures/{2018 + rm.randrange(7)}/{1 + rm.randrange(12):02d}/IMG_{i:04d}.jpg"
            W.file(rel, data)
            first_photo = first_photo or data
            if i == 2 or rm.random() < 0.1:  # "re-imported from the phone": an exact copy
                W.file(f"Pictures/Phone Import/IMG_{9000 + i:04d}.JPG", data)
                used += size
        elif kind in ("mp3", "zip"):
            if kind == "mp3":
                rel = f"Music/{rm.choice(words).capitalize()}/{rm.choice(words)}_{i}.mp3"
            else:
                rel = f"Downloads/{rm.choice(words)}_{i}.zip"
            magic = b"ID3\x04\x00" if kind == "mp3" else b"PK\x03\x04"
            W.file(rel, magic + random_bytes(size, seed, kind, i))
        elif kind == "pdf":
            parts = [b"%PDF-1.5\n"]
            got = 0
            while got < size:
                if rm.random() < 0.5:
                    txt = text_blob("prose", rm.randint(2 * KiB, 64 * KiB), rm, i)
                    part = b"BT /F1 12 Tf (" + txt + b") Tj ET\n"
                else:
                    rnd = random_bytes(rm.randint(4 * KiB, 256 * KiB), seed, "pdf", i, got)
                    part = b"stream\n" + rnd + b"\nendstream\n"
                parts.append(part)
                got += len(part)
            W.file(f"Documents/Papers/{rm.choice(words)}_{i}.pdf", b"".join(parts)[:size])
        elif kind == "log":
            rel = f".local/share/{rm.choice(lapps)}/logs/{rm.choice(words)}_{i}.log"
            W.file(rel, text_blob("log", size, rm, i))
        elif kind == "csv":
            data = b"id,amount,ratio,label,date\n" + text_blob("csv", size, rm, i)
            W.file(f"Documents/Data/{rm.choice(words)}_{i}.csv", data)
        else:  # sqlite-like: 4 KiB pages, partly filled with text, the rest zeros
            pages = [b"SQLite format 3\0" + bytes(4096 - 16)]
            for k in range(max(1, size // 4096)):
                fill = rm.randint(200, 3800)
                body = text_blob("config", fill, rm, k)
                pages.append(b"\x0d\x00" + body + bytes(4094 - len(body)))
            W.file(f".mozilla/profile.default/{rm.choice(words)}_{i}.sqlite", b"".join(pages))
        used += size

    # -- large random binaries (~20 %) ---------------------------------------------
    for rel, frac in (
        (_VIDEO, 0.45),
        ("Downloads/dataset-archive.tar.gz", 0.33),
        ("Downloads/installer-x86_64.bin", 0.22),
    ):
        W.file(rel, random_pieces(max(64 * KiB, int(large_budget * frac)), seed, rel))
    W.file("Downloads/setup.sh", b"#!/bin/sh\necho installing\n", mode=0o755)

    # -- VM image (~25 %) with duplicated regions ------------------------------------
    _vm_image(W, "VMs/debian-12.img", vm_size, seed, first_photo)

    # -- sparse files -------------------------------------------------------------------
    rs = Rng(seed, "sparse")
    sparse_size = max(8 * MiB, total // 16) // (4 * KiB) * (4 * KiB)
    ranges = [
        (0, text_blob("log", 64 * KiB, rs, "sparse0")),
        (sparse_size // 2, random_bytes(32 * KiB, seed, "sparse-mid")),
        (sparse_size - 64 * KiB, random_bytes(64 * KiB, seed, "sparse-end")),
    ]
    _sparse_file(W, "VMs/sparse-disk.raw", sparse_size, ranges)
    thin = max(4 * MiB, total // 64) // (4 * KiB) * (4 * KiB)
    _sparse_file(W, "VMs/thin-provisioned.img", thin, [(0, random_bytes(16 * KiB, seed, "thin"))])

    # -- symlinks and hardlinks ---------------------------------------------------------
    p0 = f"Projects/{projects[0]}"
    W.symlink(f"../{p0}/README.md", "Desktop/readme-link.md")
    W.symlink("../Projects", "Desktop/projects")  # to a directory: must not be followed
    W.symlink(os.path.join(os.path.abspath(root), p0, "README.md"), "Desktop/absolute-link")
    W.symlink("does/not/exist.txt", "Desktop/dangling")
    W.symlink("loop-b", "Desktop/loop-a")
    W.symlink("loop-a", "Desktop/loop-b")
    W.symlink("LICENSE", f"{p0}/COPYING")
    W.symlink("Résumé — final.txt", "Documents/unicode/link to résumé")
    W.link(f"{p0}/LICENSE", "Documents/LICENSE.hardlink")
    W.link(f"{p0}/LICENSE", "Desktop/LICENSE")
    W.link(".bashrc", ".bashrc.hardlink")

    # -- directory mtimes last, deepest first ------------------------------------------
    rd = Rng(seed, "dir-mtimes")
    for d in sorted(W.dirs, key=lambda s: (-s.count("/"), s)):
        t = rd.mtime_ns()
        os.utime(W.path(d), ns=(t, t))
    t = rd.mtime_ns()
    os.utime(root, ns=(t, t))


def _vm_image(W: _Writer, rel: str, size: int, seed: int, photo: bytes) -> None:
    """Zero, random and text runs plus 4 KiB-aligned copies of earlier regions and a photo."""
    rv = Rng(seed, "vm")
    W.mkdir(os.path.dirname(rel))
    fd = os.open(W.path(rel), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    max_run = max(4 * KiB, min(8 * MiB, size // 16)) // (4 * KiB)
    pos = 0
    k = 0
    try:
        while pos < size:
            n = min(size - pos, rv.randint(1, max_run) * 4 * KiB)
            # the first few regions are fixed, so that even a tiny image has every kind
            x = (0.40, 0.10, 0.60, 0.75, 0.90)[k] if k < 5 else rv.random()
            if x < 0.30 and k:
                data = bytes(n)
            elif x < 0.55 or pos < 4 * KiB:
                data = random_bytes(n, seed, "vm", k)
            elif x < 0.72:  # a copy of an earlier region (4 KiB aligned)
                src = rv.randrange(max(1, (pos - n) // 4096 + 1)) * 4096 if pos > n else 0
                data = os.pread(fd, min(n, pos - src), src)
            elif x < 0.78:
                data = photo[:n]
                data += bytes(-len(data) % 4096)
            else:
                data = text_blob(rv.choice(["log", "code", "config"]), n, rv, k)
            data = data[: size - pos]
            os.pwrite(fd, data, pos)
            pos += len(data)
            k += 1
        os.fchmod(fd, 0o644)
        t = W.t.mtime_ns()
        os.utime(fd, ns=(t, t))
    finally:
        os.close(fd)
    W.nfiles += 1
    W.nbytes += size


def _sparse_file(W: _Writer, rel: str, size: int, ranges: list[tuple[int, bytes]]) -> None:
    W.mkdir(os.path.dirname(rel))
    fd = os.open(W.path(rel), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, data in ranges:
            os.pwrite(fd, data, off)
            W.nbytes += len(data)
        os.fchmod(fd, 0o644)
        t = W.t.mtime_ns()
        os.utime(fd, ns=(t, t))
    finally:
        os.close(fd)
    W.nfiles += 1


# --------------------------------------------------------------------------- mutate_tree
def _scan(root: str) -> tuple[list[tuple[str, os.stat_result]], list[str], list[str]]:
    """Sorted (regular files with lstat, directories, symlinks), relative str paths."""
    files: list[tuple[str, os.stat_result]] = []
    dirs: list[str] = []
    links: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                dirs.append(r)
                stack.append(r)
            elif stat.S_ISLNK(st.st_mode):
                links.append(r)
            elif stat.S_ISREG(st.st_mode):
                files.append((r, st))
    files.sort(key=lambda x: x[0])
    dirs.sort()
    links.sort()
    return files, dirs, links


def _is_sparse(st: os.stat_result) -> bool:
    return st.st_size > 64 * KiB and st.st_blocks * 512 < st.st_size // 2


def mutate_tree(root: Path, seed: int = 2) -> None:
    """Apply a deterministic change set to a tree made by ``make_tree``.

    The same tree state and seed give the same result. The changes: in-place edits of
    about 2 % of the files (insertions that shift bytes, overwrites, appends, cuts), an
    insertion in the middle of the video (or else the largest file), overwritten 4 KiB
    blocks of the VM image, an append to a log, touches (mtime only), deletions, new
    files and a new directory, a retargeted symlink, mode changes and finally a renamed
    directory. Hardlinked, sparse and read-only files are left alone; the directories
    whose entries changed get new mtimes.
    """
    _mutate(Path(root), seed)


def _mutate(root_path: Path, seed: int) -> dict[str, object]:
    root = str(root_path)
    if not os.path.isdir(root):
        raise NotADirectoryError(root)
    rng = Rng(seed, "mutate")
    files, dirs, links = _scan(root)
    touched_dirs: set[str] = set()
    counts = dict.fromkeys(("edited", "touched", "deleted", "added", "chmod", "bytes_inserted"), 0)

    def p(rel: str) -> str:
        return os.path.join(root, rel)

    def stamp(rel: str) -> None:
        t = rng.mtime_ns(MUTATE_NS, _DAY_NS)
        os.utime(p(rel), ns=(t, t), follow_symlinks=False)
        touched_dirs.add(os.path.dirname(rel))

    def count(k: str, n: int = 1) -> None:
        counts[k] += n

    def new_file(rel: str, data: bytes) -> None:
        with open(p(rel), "xb") as f:
            f.write(data)
        os.chmod(p(rel), 0o644)
        stamp(rel)
        count("added")

    cand = [
        (rel, st)
        for rel, st in files
        if st.st_nlink == 1 and not _is_sparse(st) and st.st_mode & stat.S_IWUSR
    ]
    vm = "VMs/debian-12.img"
    cand = [c for c in cand if c[0] != vm]
    largest = max(cand, key=lambda x: (x[0] == _VIDEO, x[1].st_size, x[0]))[0] if cand else None
    cand = [c for c in cand if c[0] != largest]
    n = len(cand)
    k_edit, k_touch, k_del, k_mode = (max(2, round(n * f)) for f in (0.02, 0.005, 0.005, 0.002))
    picks = rng.sample(range(n), min(n, k_edit + k_touch + k_del + k_mode))
    edit_picks = picks[:k_edit]
    touch_picks = picks[k_edit : k_edit + k_touch]
    del_picks = picks[k_edit + k_touch : k_edit + k_touch + k_del]
    mode_picks = picks[k_edit + k_touch + k_del :]

    def insert(rel: str, off: int, data: bytes) -> None:
        with open(p(rel), "r+b") as f:
            f.seek(off)
            tail = f.read()
            f.seek(off)
            f.write(data)
            f.write(tail)
        count("bytes_inserted", len(data))

    for j in edit_picks:
        rel, st = cand[j]
        size = st.st_size
        op = rng.weighted([("insert", 50.0), ("overwrite", 20.0), ("append", 15.0), ("cut", 15.0)])
        if size == 0:
            op = "append"
        ln = rng.randint(1, 4 * KiB)
        if rng.random() < 0.6:
            data = text_blob("code", ln, rng, "mutated")
        else:
            data = random_bytes(ln, seed, "mutate", rel)
        off = rng.randrange(size) if size else 0
        if op == "insert":
            insert(rel, off, data)
        else:
            with open(p(rel), "r+b") as f:
                if op == "overwrite":
                    f.seek(off)
                    f.write(data[: max(1, size - off)])
                elif op == "append":
                    f.seek(0, os.SEEK_END)
                    f.write(data)
                else:  # cut a range out
                    cut = min(size - off, ln)
                    f.seek(off + cut)
                    tail = f.read()
                    f.seek(off)
                    f.write(tail)
                    f.truncate(size - cut)
        stamp(rel)
        count("edited")
    for j in touch_picks:
        stamp(cand[j][0])
        count("touched")
    for j in mode_picks:
        rel, st = cand[j]
        new = 0o600 if stat.S_IMODE(st.st_mode) != 0o600 else 0o640
        os.chmod(p(rel), new)
        count("chmod")
    for j in del_picks:
        os.unlink(p(cand[j][0]))
        touched_dirs.add(os.path.dirname(cand[j][0]))
        count("deleted")
    gone = {cand[j][0] for j in del_picks}

    # forced changes: bytes inserted in the middle of the video (shifting the rest),
    # some overwritten 4 KiB blocks of the VM image, an append to a log
    if largest is not None:
        size = os.path.getsize(p(largest))
        insert(largest, size // 2 + 123, b"inserted:" + random_bytes(3000, seed, "insert"))
        stamp(largest)
        count("edited")
    if os.path.isfile(p(vm)):
        size = os.path.getsize(p(vm))
        with open(p(vm), "r+b") as f:
            for b in range(8):
                f.seek(rng.randrange(max(1, size // 4096)) * 4096)
                f.write(random_bytes(4096, seed, "vm-block", b))
        stamp(vm)
        count("edited")
    logs = [
        rel
        for rel, _ in cand
        if rel.endswith(".log") and rel not in gone and os.path.isfile(p(rel))
    ]
    if logs:
        rel = rng.choice(logs)
        with open(p(rel), "ab") as fa:
            fa.write(text_blob("log", 64 * KiB, rng, "appended"))
        stamp(rel)
        count("edited")

    # additions: new files in existing directories and a new directory
    live = [d for d in dirs if ".git/objects" not in d and "node_modules" not in d]
    live = [d for d in live if os.stat(p(d)).st_mode & stat.S_IWUSR]
    for i in range(max(3, round(n * 0.01))):
        ext = rng.choice(["py", "md", "txt", "json"])
        rel = f"{rng.choice(live)}/new_{rng.hexs(6)}_{i}.{ext}"
        kind = rng.choice(["code", "prose", "config"])
        new_file(rel, text_blob(kind, rng.logsize(4, 15), rng, rel))
    newdir = f"Documents/new-{rng.hexs(8)}"
    os.mkdir(p(newdir))
    os.chmod(p(newdir), 0o755)
    touched_dirs.add(os.path.dirname(newdir))
    for i in range(8):
        rel = f"{newdir}/note_{i:02d}.md"
        new_file(rel, text_blob("prose", rng.logsize(6, 15), rng, rel))
    new_file(f"{newdir}/scan.jpg", b"\xff\xd8\xff\xe0" + random_bytes(256 * KiB, seed, "new-scan"))

    # a retargeted symlink
    retarget = "Desktop/readme-link.md" if "Desktop/readme-link.md" in links else None
    if retarget is None and links:
        retarget = links[0]
    if retarget is not None:
        os.unlink(p(retarget))
        os.symlink("../.bashrc", p(retarget))
        stamp(retarget)

    # rename a directory holding a few files (not the new one)
    below: dict[str, int] = {}
    for rel, _ in files:
        d = os.path.dirname(rel)
        while d:
            below[d] = below.get(d, 0) + 1
            d = os.path.dirname(d)
    rdirs = [
        d
        for d in dirs
        if 3 <= below.get(d, 0) <= 3000 and 1 <= d.count("/") <= 3 and os.path.isdir(p(d))
    ]
    renamed: tuple[str, str] | None = None
    if rdirs:
        d = rng.choice(rdirs)
        renamed = (d, f"{d}-renamed-{rng.hexs(4)}")
        os.rename(p(d), p(renamed[1]))
        touched_dirs.add(os.path.dirname(d))
        touched_dirs.add(renamed[1])

    for d in sorted(touched_dirs, key=lambda s: (-s.count("/"), s)):
        if renamed and (d == renamed[0] or d.startswith(renamed[0] + "/")):
            d = renamed[1] + d[len(renamed[0]) :]
        if os.path.isdir(p(d)):
            t = rng.mtime_ns(MUTATE_NS, _DAY_NS)
            os.utime(p(d), ns=(t, t))
    return {**counts, "inserted_into": largest, "retargeted": retarget, "renamed": renamed}


# --------------------------------------------------------------------------- CLI
def tree_stats(root: Path) -> dict[str, int]:
    """Counts and sizes of a tree: files, dirs, symlinks, apparent and allocated bytes."""
    out = dict.fromkeys(("files", "dirs", "symlinks", "apparent", "allocated"), 0)
    stack = [os.fsencode(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    out["dirs"] += 1
                    stack.append(e.path)
                elif stat.S_ISLNK(st.st_mode):
                    out["symlinks"] += 1
                else:
                    out["files"] += 1
                    out["apparent"] += st.st_size
                    out["allocated"] += st.st_blocks * 512
    return out


def _summary(root: Path, seconds: float) -> str:
    s = tree_stats(root)
    return (
        f"{root}: {s['files']} files, {s['dirs']} dirs, {s['symlinks']} symlinks, "
        f"{s['apparent'] / MiB:.1f} MiB apparent, {s['allocated'] / MiB:.1f} MiB allocated, "
        f"{seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--size-mb", type=float, default=16.0, help="target size in MiB (default 16)")
    ap.add_argument("--seed", type=int, default=None, help="default 1, or 2 with --mutate")
    ap.add_argument("--mutate", action="store_true", help="apply the change set to OUT instead")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.mutate:
        stats = _mutate(a.out, 2 if a.seed is None else a.seed)
        if not a.quiet:
            print("mutate: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    else:
        make_tree(a.out, int(a.size_mb * MiB), 1 if a.seed is None else a.seed)
    if not a.quiet:
        print(_summary(a.out, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
