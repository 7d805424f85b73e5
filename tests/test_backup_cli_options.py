"""The backup command's options come from one table (safehold.ops.options.BACKUP_OPTS): every
option of the table is a flag, parsed and converted the way the library and jobs file take it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safehold.cli.main import build_parser
from safehold.ops.options import BACKUP_OPTS, backup_options
from tests.conftest import Cli


def test_every_table_option_is_a_backup_flag() -> None:
    parser = build_parser()
    args = ["backup"]
    for o in BACKUP_OPTS:
        if o.kind == "list":
            args += [o.flag, "a", o.flag, "b"]
        elif o.kind == "bool":
            args += [o.flag]
        elif o.kind == "size":
            args += [o.flag, "10M"]
        else:
            args += [o.flag, "zstd,5" if o.name == "compression" else "x"]
    ns = parser.parse_args([*args, "/p"])
    for o in BACKUP_OPTS:
        value = getattr(ns, o.name)
        assert value is not None, o.name
        if o.kind == "list":
            assert value == ["a", "b"], o.name
    opts = backup_options({"exclude_larger_than": "10M", "compression": "zstd,5"})
    assert opts.exclude_larger_than == 10 << 20 and opts.compression == "zstd,5"
    # nothing given: nothing set, so the library's defaults apply
    ns = parser.parse_args(["backup", "/p"])
    assert all(getattr(ns, o.name) is None for o in BACKUP_OPTS)


def _summary(out: str) -> dict[str, object]:
    last: dict[str, object] = json.loads(out.splitlines()[-1])
    return last


def test_short_flags_and_compression(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    text = b"the same words again and again " * 20_000
    (src / "a.txt").write_bytes(text)
    (src / "skip.tmp").write_bytes(b"t")
    cli.ok("init")
    cli.ok("backup", "-e", "*.tmp", "-x", "--compression", "none", str(src))
    names = cli.ok("ls", "latest").out
    assert "a.txt" in names and "skip.tmp" not in names
    stats = json.loads(cli.ok("stats", "--json").out)
    assert stats["stored_size"] > len(text)  # stored raw: --compression none was taken
    r = cli("backup", "--compression", "brotli", str(src))
    assert r.code == 2 and "invalid compression 'brotli'" in r.err and "Traceback" not in r.err


def test_bad_values_name_the_flag(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    cli.ok("init")
    r = cli("backup", "--exclude-larger-than", "lots", str(src))
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert lines == [
        "safehold: --exclude-larger-than: invalid size 'lots' (expected e.g. 512K, 10M, 1.5G)"
    ], r.err
    s = _summary(
        cli.ok("backup", "--json", "--exclude-larger-than", "512", "--tag", "t1", str(src)).out
    )
    assert s["files_new"] == 0  # the 1000-byte file is larger than 512 bytes
    snaps = json.loads(cli.ok("snapshots", "--json").out)
    assert snaps[-1]["tags"] == ["t1"]
