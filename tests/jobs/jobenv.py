"""A jobs file, its repositories and state directory, driven through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import FAST_KDF, PASSWORD, Cli, Result


class JobEnv:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        home = tmp / "home"
        home.mkdir(exist_ok=True)
        self.cli = Cli(home, tmp / "unused-repo")
        self.state = tmp / "state"
        self.cli.env["SAFEHOLD_STATE_DIR"] = str(self.state)
        self.cli.env.pop("SAFEHOLD_PASSWORD", None)
        self.pwfile = tmp / "pass"
        self.pwfile.write_text(PASSWORD + "\n")
        self.config = tmp / "safehold.toml"

    def init_repo(self, url: str, *extra: str) -> None:
        self.cli.ok("--repo", url, "--password-file", str(self.pwfile), "init", *extra, repo=False)

    def write(self, text: str) -> None:
        self.config.write_text(text)

    def __call__(self, *args: str, **kw: Any) -> Result:
        return self.cli("--config", str(self.config), *args, repo=False, **kw)

    def jobs_json(self) -> list[dict[str, Any]]:
        r = self("--json", "jobs")
        assert r.code == 0, str(r)
        out: list[dict[str, Any]] = json.loads(r.out)
        return out

    def history(self, job: str) -> list[dict[str, Any]]:
        r = self("--json", "jobs", "history", job)
        assert r.code == 0, str(r)
        out: list[dict[str, Any]] = json.loads(r.out)
        return out

    def repo_cli(self, url: str, *args: str, **kw: Any) -> Result:
        return self.cli("--repo", url, "--password-file", str(self.pwfile), *args, repo=False, **kw)

    def snapshots(self, url: str) -> list[dict[str, Any]]:
        r = self.repo_cli(url, "--json", "snapshots")
        assert r.code == 0, str(r)
        out: list[dict[str, Any]] = json.loads(r.out)
        return out

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "safehold", "--config", str(self.config), *args],
            env=self.cli.env | {"SAFEHOLD_KDF": FAST_KDF},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


def repo_block(name: str, url: str, pwfile: Path, options: dict[str, str] | None = None) -> str:
    text = f'[repositories.{name}]\nurl = "{url}"\npassword_file = "{pwfile}"\n'
    if options:
        inner = ", ".join(f'"{k}" = "{v}"' for k, v in options.items())
        text += f"options = {{ {inner} }}\n"
    return text + "\n"


def environ_without_safehold() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SAFEHOLD_")}
