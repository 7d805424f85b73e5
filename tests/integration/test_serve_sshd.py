"""safehold serve through a real OpenSSH sshd, with the forced command README.md documents:
the client can back up and restore, but can neither delete, plant a prune plan nor reach
outside the path."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.backends.remote import RemoteBackend
from safehold.errors import PermanentError
from safehold.format.plan import PlanFile
from safehold.ids import name_to_id, plan_name, storage_id
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository
from tests.backends.sshserver import keygen, sshd_missing, start_sshd
from tests.conftest import PASSWORD, Cli
from tests.support.tools import skip_or_fail
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree


@pytest.fixture(autouse=True)
def _needs_openssh() -> None:
    """OpenSSH's sshd and ssh: a skip on a laptop without them, a failure under CI."""
    missing = sshd_missing() or (None if shutil.which("ssh") else "the ssh client is missing")
    if missing:
        skip_or_fail(f"needs OpenSSH's sshd and ssh ({missing})")


def _wipe_everything_plan(repo_dir: Path, cache: Path) -> tuple[str, bytes]:
    """The name and bytes of a prune plan, properly encrypted with the repository's meta key,
    that condemns every pack and index object and is due at once (it claims every index and
    snapshot as known when it was made): what a stolen client holding the password would
    plant for the owner's next prune to carry out."""
    repo = Repository.open(LocalBackend(repo_dir), PASSWORD.encode(), cache_dir=cache)
    try:
        packs = [name_to_id(i.name) for i in repo.backend.list("data/")]
        indexes = repo.list_ids("index/")
        plan = PlanFile(
            time_ns=0,
            condemned=sorted(bytes.fromhex(p) for p in packs),
            superseded=[bytes.fromhex(i) for i in indexes],
            indexes=[bytes.fromhex(i) for i in indexes],
            snapshots=[bytes.fromhex(s) for s in repo.list_ids("snapshots/")],
        )
        data = meta_object(plan.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
    finally:
        repo.close()
    assert packs
    return plan_name(storage_id(data)), data


def test_forced_command_append_only(cli: Cli, tmp_path: Path) -> None:
    work = tmp_path / "sshd"
    work.mkdir()
    server = start_sshd(work)
    try:
        served = tmp_path / "srv"
        served.mkdir()
        pub = keygen(work / "backup_key", "laptop")
        # the authorized_keys line of README.md, with this machine's paths
        command = f"{sys.executable} -m safehold serve --restrict-to-path {served} --append-only"
        (work / "authorized_keys").write_text(f'command="{command}",restrict {pub}\n')
        rsh = (
            f"ssh -i {work / 'backup_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={server.known_hosts} -o StrictHostKeyChecking=yes"
        )
        cli.env["SAFEHOLD_RSH"] = rsh
        base = f"ssh://{server.user}@127.0.0.1:{server.port}"
        # the owner inits on the server itself; the append-only key cannot create a repository
        cli.repo = served / "laptop"
        cli.ok("init")
        cli.repo = f"{base}/~/other"  # type: ignore[assignment]
        r = cli("init")
        assert r.code == 2 and "append-only" in r.err and len(r.err.strip().splitlines()) == 1
        assert not (served / "other").exists()
        cli.repo = f"{base}/~/laptop"  # type: ignore[assignment]

        src = tmp_path / "src"
        make_tree(src, 2 << 20, seed=5)
        cli.ok("backup", str(src))
        cli.ok("backup", str(src))
        cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
        assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
        cli.ok("check", "--read-data")
        snaps = json.loads(cli.ok("snapshots", "--json").out)
        r = cli("forget", snaps[0]["id"])
        assert r.code == 2 and "append-only" in r.err
        assert len(json.loads(cli.ok("snapshots", "--json").out)) == 2

        # a stolen client plants a prune plan (and a key, and a new config): all refused
        plan, plan_data = _wipe_everything_plan(served / "laptop", tmp_path / "owner-cache")
        ssh = [*shlex.split(rsh), "-p", str(server.port), f"{server.user}@127.0.0.1"]
        stolen = RemoteBackend(f"{base}/~/laptop", [*ssh, "safehold", "serve"], "laptop")
        try:
            plants = {
                plan: (plan_data, False),
                f"keys/{'ab' * 32}": (b"{}", False),
                "config": (b"x", True),
            }
            for name, (data, overwrite) in plants.items():
                refused = f"append-only: refusing to [a-z]+ {re.escape(name)} "
                with pytest.raises(PermanentError, match=refused):
                    stolen.store(name, data, overwrite=overwrite)
        finally:
            stolen.close()
        assert not (served / "laptop" / "plans").exists()
        assert not (served / "laptop" / "keys" / ("ab" * 32)).exists()

        # the owner's next prune (trusted, direct) finds no plan: every snapshot still restores
        cli.repo = served / "laptop"
        cli.ok("prune", "--grace-minutes", "0")
        cli.repo = f"{base}/~/laptop"  # type: ignore[assignment]
        for i, snap in enumerate(snaps):
            target = tmp_path / f"r{i}"
            cli.ok("restore", snap["id"], "--target", str(target))
            assert compare_trees(src, target / str(src).lstrip("/")) == []
        cli.ok("check", "--read-data")

        # the key cannot reach anything outside the served path, whatever the client asks
        for outside in ("/etc", "/~/../outside", str(tmp_path)):
            cli.repo = f"{base}{outside}"  # type: ignore[assignment]
            r = cli("init")
            assert r.code == 2 and "outside" in r.err, (outside, r.err)
        assert not (tmp_path / "outside").exists()
    finally:
        server.stop()
