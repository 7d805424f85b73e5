#!/usr/bin/env python3
"""Benchmark safehold against restic and borg on the same generated corpus.

    python bench/bench.py [--size-mb 1024] [--runs 3] [--tools safehold,restic,borg]
                          [--workdir DIR] [--seed 1] [--no-drop-caches] [--keep]

Per run and tool: init, backup1 (first), backup2 (nothing changed), then the source copy
is changed once (tests/support/treegen.py mutate_tree), backup3, restore (into an empty
dir), verify (untimed: the restored tree must equal the source) and check (reading all
data). Every timed step runs under /usr/bin/time after a page-cache drop (when root).
Medians over the runs are printed per tool and step, then safehold/peer ratios, and all
figures are written to WORKDIR/results.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PASSWORD = "bench-password"
MUTATE_SEED = 2
TIMED_STEPS = ("init", "backup1", "backup2", "backup3", "restore", "check")
BACKUPS = ("backup1", "backup2", "backup3")


def _load(name: str) -> ModuleType:
    """Import tests/support/NAME.py by path (works from a fresh clone, nothing installed)."""
    path = ROOT / "tests" / "support" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_safehold_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


treegen = _load("treegen")
treecmp = _load("treecmp")


# --------------------------------------------------------------------------- tools
@dataclass
class Command:
    argv: list[str]
    cwd: Path | None = None
    ok_codes: tuple[int, ...] = (0,)


class Tool:
    """One backup program. Subclasses say how each step is run."""

    name = ""
    binary = ""
    install_hint = ""

    s3: S3Server | None = None  # set by --s3: repositories live in buckets of that server
    supports_s3 = False

    def __init__(self, work: Path) -> None:
        self.work = work
        self.exe = self.find()
        self.version = self.get_version() if self.exe else "not found"

    @property
    def bucket(self) -> str:
        return f"bench-{self.name}"

    def repo_bytes(self) -> int:
        return self.s3.bucket_bytes(self.bucket) if self.s3 else du_bytes(self.repo)

    def find(self) -> str | None:
        return shutil.which(self.binary)

    def get_version(self) -> str:
        return _first_line([self.exe or self.binary, "--version"])

    @property
    def repo(self) -> Path:
        return self.work / f"repo-{self.name}"

    @property
    def cache(self) -> Path:
        return self.work / f"cache-{self.name}"

    @property
    def target(self) -> Path:
        return self.work / f"restore-{self.name}"

    def env(self) -> dict[str, str]:
        return {}

    def command(self, step: str, src: Path) -> Command:
        raise NotImplementedError

    def restored(self, src: Path) -> Path:
        """Where the restore step puts ``src`` (TARGET/<absolute source path>)."""
        return self.target / src.relative_to(src.anchor)


class Safehold(Tool):
    name = "safehold"
    binary = "safehold"
    install_hint = "pip install -e . (run this script with that environment's python)"

    def find(self) -> str | None:
        beside = Path(sys.executable).parent / "safehold"
        return str(beside) if beside.exists() else shutil.which(self.binary)

    def get_version(self) -> str:
        return _first_line([self.exe or self.binary, "--version"]) or "safehold (unknown version)"

    supports_s3 = True

    def env(self) -> dict[str, str]:
        return {"SAFEHOLD_PASSWORD": PASSWORD, "SAFEHOLD_CACHE_DIR": str(self.cache)} | (
            self.s3.env() if self.s3 else {}
        )

    def command(self, step: str, src: Path) -> Command:
        repo = (
            ["--repo", f"s3://{self.bucket}/repo", "-o", f"s3.endpoint={self.s3.url}"]
            if self.s3
            else ["--repo", str(self.repo)]
        )
        base = [self.exe or self.binary, *repo]
        if step == "init":
            return Command([*base, "init"])
        if step in BACKUPS:
            return Command([*base, "backup", "--host", "bench", str(src)])
        if step == "restore":
            return Command([*base, "restore", "latest", "--target", str(self.target)])
        if step == "check":
            return Command([*base, "check", "--read-data"])
        raise ValueError(step)


class Restic(Tool):
    name = "restic"
    binary = "restic"
    install_hint = "apt-get install restic"

    def get_version(self) -> str:
        return _first_line([self.exe or self.binary, "version"])

    def version_tuple(self) -> tuple[int, ...]:
        m = re.search(r"restic (\d+)\.(\d+)\.(\d+)", self.version)
        return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)

    supports_s3 = True

    def env(self) -> dict[str, str]:
        return {"RESTIC_PASSWORD": PASSWORD} | (self.s3.env() if self.s3 else {})

    def command(self, step: str, src: Path) -> Command:
        repo = f"s3:{self.s3.url}/{self.bucket}" if self.s3 else str(self.repo)
        base = [self.exe or self.binary, "-r", repo, "--cache-dir", str(self.cache)]
        if step == "init":
            # format version 2 (compression) exists since 0.14; older versions only have 1
            extra = ["--repository-version", "2"] if self.version_tuple() >= (0, 14) else []
            return Command([*base, "init", *extra])
        if step in BACKUPS:
            return Command([*base, "backup", "--host", "bench", str(src)])
        if step == "restore":
            # restore --sparse exists since 0.15; without it holes are written as zeros
            extra = ["--sparse"] if self.version_tuple() >= (0, 15) else []
            return Command([*base, "restore", "latest", "--target", str(self.target), *extra])
        if step == "check":
            return Command([*base, "check", "--read-data"])
        raise ValueError(step)


class Borg(Tool):
    name = "borg"
    binary = "borg"
    install_hint = "apt-get install borgbackup"

    def env(self) -> dict[str, str]:
        return {
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.cache),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_DISPLAY_PASSPHRASE": "no",
        }

    def command(self, step: str, src: Path) -> Command:
        exe = self.exe or self.binary
        ok = (0, 1)  # 1 = finished with warnings (e.g. a file changed while read)
        if step == "init":
            return Command([exe, "init", "--encryption=repokey", str(self.repo)])
        if step in BACKUPS:
            archive = f"{self.repo}::{step}"
            return Command([exe, "create", "--compression", "zstd,3", archive, str(src)], None, ok)
        if step == "restore":  # extracts relative paths (no leading /) into the cwd
            return Command([exe, "extract", "--sparse", f"{self.repo}::backup3"], self.target, ok)
        if step == "check":
            return Command([exe, "check", "--verify-data", str(self.repo)])
        raise ValueError(step)


TOOLS: dict[str, Callable[[Path], Tool]] = {"safehold": Safehold, "restic": Restic, "borg": Borg}


def _first_line(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0].strip() if p.returncode == 0 and lines else ""


# --------------------------------------------------------------------------- measuring
@dataclass
class Measure:
    run: int
    tool: str
    step: str
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    rss_mib: float = 0.0
    repo_bytes: int = 0
    data_bytes: int = 0  # bytes the MB/s figure is based on
    rc: int = 0
    ok: bool = True
    note: str = ""

    @property
    def mbps(self) -> float | None:
        return self.data_bytes / 1e6 / self.wall_s if self.data_bytes and self.wall_s > 0 else None


class CacheDropper:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and hasattr(os, "geteuid") and os.geteuid() == 0
        self.why_not = "" if self.enabled else ("--no-drop-caches" if not enabled else "not root")

    def __call__(self) -> None:
        if not self.enabled:
            return
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            self.enabled = False
            self.why_not = f"cannot write /proc/sys/vm/drop_caches: {e.strerror}"
            print(f"# warning: {self.why_not}; the steps run with a warm cache", file=sys.stderr)


def run_timed(
    cmd: Command, env: dict[str, str], log: Path
) -> tuple[int, float, float, float, float]:
    """Run ``cmd``; returns rc, wall s, user s, sys s, peak RSS KiB (as /usr/bin/time sees it)."""
    full_env = {**os.environ, **env}
    with open(log, "a") as out:
        out.write(f"### {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd.argv)}\n")
        out.flush()
        if os.access("/usr/bin/time", os.X_OK):
            with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
                argv = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd.argv]
                p = subprocess.run(
                    argv,
                    cwd=cmd.cwd,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
                fields = (tf.read().strip().splitlines() or ["0 0 0 0"])[-1].split()
            wall, user, sys_, rss = (float(x) for x in fields[:4])
            return p.returncode, wall, user, sys_, rss
        # no /usr/bin/time: the same figures from wait4()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd.argv,
            cwd=cmd.cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, wall, ru.ru_utime, ru.ru_stime, float(ru.ru_maxrss)


def du_bytes(path: Path) -> int:
    """Apparent bytes below ``path`` (like du -sb)."""
    if not path.exists():
        return 0
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total + os.lstat(path).st_size


def rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class S3Server:
    """A real S3 server process (moto_server, from the test extra) on 127.0.0.1, which safehold
    and restic back up to in the same run (borg does not speak S3)."""

    def __init__(self, log: Path) -> None:
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")  # noqa: SIM115 - open for the server's whole life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"moto_server did not start, see {log}")
        import boto3

        self.client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def fresh_bucket(self, name: str) -> None:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    self.client.delete_object(Bucket=name, Key=obj["Key"])
            self.client.delete_bucket(Bucket=name)
        except Exception:  # the bucket did not exist yet
            pass
        self.client.create_bucket(Bucket=name)

    def bucket_bytes(self, name: str) -> int:
        total = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=name):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()


# --------------------------------------------------------------------------- the bench
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    tools: list[Tool]
    drop: CacheDropper
    measures: list[Measure] = field(default_factory=list)
    verify: list[dict[str, Any]] = field(default_factory=list)
    corpus_path: Path = Path()

    @property
    def src(self) -> Path:
        return self.work / "src"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def corpus(self) -> Path:
        """The generated corpus, cached in the work dir (keyed by generator version, size, seed)."""
        a = self.args
        key = f"corpus-v{treegen.GENERATOR_VERSION}-{a.size_mb:g}mb-seed{a.seed}"
        path = self.work / key
        if path.is_dir():
            print(f"# corpus: reusing {path}", file=sys.stderr)
            return path
        partial = self.work / (key + ".partial")
        rm(partial)
        print(
            f"# corpus: generating {a.size_mb:g} MiB (seed {a.seed}) into {path}", file=sys.stderr
        )
        t0 = time.perf_counter()
        treegen.make_tree(partial, int(a.size_mb * MiB), a.seed)
        partial.rename(path)
        print(f"# corpus: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return path

    def reset(self) -> None:
        for t in self.tools:
            for p in (t.repo, t.cache, t.target):
                rm(p)
            if t.s3 is not None:
                t.s3.fresh_bucket(t.bucket)
        rm(self.src)

    def step(self, run: int, tool: Tool, step: str, data_bytes: int) -> Measure:
        m = Measure(run, tool.name, step)
        cmd = tool.command(step, self.src)
        if step == "restore":
            tool.target.mkdir(parents=True)
        self.drop()
        rc, wall, user, sys_, rss_kib = run_timed(cmd, tool.env(), self.logs / f"{tool.name}.log")
        m.rc, m.wall_s, m.user_s, m.sys_s, m.rss_mib = rc, wall, user, sys_, rss_kib / 1024
        m.ok = rc in cmd.ok_codes
        m.repo_bytes = tool.repo_bytes()
        m.data_bytes = m.repo_bytes if step == "check" else data_bytes if step != "init" else 0
        if not m.ok:
            m.note = f"FAILED rc={rc}, see {self.logs / (tool.name + '.log')}"
        self.measures.append(m)
        print(_row(m), flush=True)
        return m

    def run_once(self, run: int) -> None:
        print(f"# run {run}/{self.args.runs}: copying the corpus to {self.src}", file=sys.stderr)
        self.reset()
        subprocess.run(["cp", "-a", str(self.corpus_path), str(self.src)], check=True)
        size = treegen.tree_stats(self.src)["apparent"]
        failed: set[str] = set()

        def do(tool: Tool, step: str, nbytes: int) -> None:
            if tool.name in failed:
                self.measures.append(Measure(run, tool.name, step, ok=False, note="skipped"))
                return
            if not self.step(run, tool, step, nbytes).ok:
                failed.add(tool.name)

        for tool in self.tools:
            for step in ("init", "backup1", "backup2"):
                do(tool, step, size)
        print(f"# run {run}: mutating the source (mutate_tree seed {MUTATE_SEED})", file=sys.stderr)
        treegen.mutate_tree(self.src, MUTATE_SEED)
        size = treegen.tree_stats(self.src)["apparent"]
        source = treecmp.tree_digest(self.src)
        for tool in self.tools:
            do(tool, "backup3", size)
            do(tool, "restore", size)
            if tool.name not in failed:
                self.check_restore(run, tool, source)
            do(tool, "check", 0)
        if not self.args.keep:
            self.reset()

    def check_restore(self, run: int, tool: Tool, source: dict[bytes, Any]) -> None:
        restored = tool.restored(self.src)
        if restored.is_dir():
            diffs = treecmp.compare_digests(source, treecmp.tree_digest(restored))
        else:
            diffs = [f"missing: the restored tree {restored}"]
        log = self.logs / f"verify-{tool.name}-run{run}.txt"
        log.write_text("".join(d + "\n" for d in diffs) or f"IDENTICAL: {len(source)} entries\n")
        if diffs:
            kinds: dict[str, int] = {}
            for d in diffs:
                k = d.split(":", 1)[0]
                kinds[k] = kinds.get(k, 0) + 1
            summary = ", ".join(f"{k} {n}" for k, n in kinds.items())
            result = f"DIFFERENT: {len(diffs)} differences ({summary}); e.g. {diffs[0]}; see {log}"
        else:
            result = f"IDENTICAL: {len(source)} entries"
        self.verify.append(
            {"run": run, "tool": tool.name, "identical": not diffs, "result": result}
        )
        print(f"{run:>3} {tool.name:<9} {'verify':<8} {result}", flush=True)
        if not self.args.keep:
            rm(tool.target)

    def main(self) -> dict[str, Any]:
        rm(self.logs)  # logs of this invocation only
        self.logs.mkdir(parents=True)
        self.corpus_path = self.corpus()
        stats = treegen.tree_stats(self.corpus_path)
        header = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "versions": {t.name: t.version for t in self.tools},
            "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "cpu": _cpu_model(),
            "corpus": {"size_mb": self.args.size_mb, "seed": self.args.seed, **stats},
            "drop_caches": self.drop.enabled,
            "runs": self.args.runs,
        }
        print(
            f"# corpus {stats['files']} files, {stats['apparent'] / 1e6:.1f} MB apparent "
            f"(--size-mb {self.args.size_mb:g} --seed {self.args.seed}); "
            + "; ".join(t.version for t in self.tools)
            + f"; python {header['python']}; {header['cores']} cores ({header['cpu']}); "
            + (
                "caches dropped before each step"
                if self.drop.enabled
                else f"warm caches ({self.drop.why_not})"
            )
        )
        print(_HEADER)
        for run in range(1, self.args.runs + 1):
            self.run_once(run)
        medians = self.medians()
        ratios = self.ratios(medians)
        print_summary(medians, ratios, self.args.runs)
        targets = evaluate_targets(ratios)
        for line in targets:
            print(line)
        results = {
            "header": header,
            "measures": [asdict(m) | {"mbps": m.mbps} for m in self.measures],
            "verify": self.verify,
            "median": medians,
            "ratios": ratios,
            "targets": targets,
        }
        out = self.work / "results.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"# results: {out}; logs: {self.logs}")
        return results

    def medians(self) -> dict[str, dict[str, dict[str, float | None]]]:
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for tool in self.tools:
            for step in TIMED_STEPS:
                ms = [m for m in self.measures if m.tool == tool.name and m.step == step and m.ok]
                if not ms:
                    continue
                wall = statistics.median(m.wall_s for m in ms)
                nbytes = statistics.median(m.data_bytes for m in ms)
                out.setdefault(tool.name, {})[step] = {
                    "wall_s": wall,
                    "mbps": nbytes / 1e6 / wall if nbytes and wall > 0 else None,
                    "cpu_s": statistics.median(m.user_s + m.sys_s for m in ms),
                    "rss_mib": statistics.median(m.rss_mib for m in ms),
                    "repo_mb": statistics.median(m.repo_bytes for m in ms) / 1e6,
                    "n": len(ms),
                }
        return out

    def ratios(self, medians: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
        """subject/peer ratios (subject: safehold if benchmarked, else the first tool)."""
        names = [t.name for t in self.tools if t.name in medians]
        if len(names) < 2:
            return {}
        subject = "safehold" if "safehold" in names else names[0]
        out: dict[str, dict[str, dict[str, float | None]]] = {}
        for peer in names:
            if peer == subject:
                continue
            key = f"{subject}/{peer}"
            for step in TIMED_STEPS:
                a = medians[subject].get(step)
                b = medians[peer].get(step)
                if a and b:
                    out.setdefault(key, {})[step] = {
                        k: _ratio(a[k], b[k]) for k in ("wall_s", "rss_mib", "repo_mb")
                    }
        return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- reporting
_METRICS = f"{'wall_s':>8} {'MB/s':>8} {'cpu_s':>8} {'rss_MiB':>8} {'repo_MB':>9}"
_HEADER = f"{'run':>3} {'tool':<9} {'step':<8} {_METRICS}"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _row(m: Measure) -> str:
    return (
        f"{m.run:>3} {m.tool:<9} {m.step:<8} {m.wall_s:>8.2f} {_fmt(m.mbps, '.1f'):>8} "
        f"{m.user_s + m.sys_s:>8.2f} {m.rss_mib:>8.0f} {m.repo_bytes / 1e6:>9.1f}"
        + (f"  {m.note}" if m.note else "")
    )


def print_summary(medians: dict[str, Any], ratios: dict[str, Any], runs: int) -> None:
    print(f"\n== median of {runs} run(s) ==")
    print(f"{'tool':<9} {'step':<8} {_METRICS}")
    for tool, steps in medians.items():
        for step, v in steps.items():
            print(
                f"{tool:<9} {step:<8} {v['wall_s']:>8.2f} {_fmt(v['mbps'], '.1f'):>8} "
                f"{v['cpu_s']:>8.2f} {v['rss_mib']:>8.0f} {v['repo_mb']:>9.1f}"
            )
    for pair, steps in ratios.items():
        print(f"\n== ratios {pair} (below 1 = {pair.split('/')[0]} better) ==")
        print(f"{'step':<8} {'wall':>7} {'rss':>7} {'repo':>7}")
        for step, v in steps.items():
            print(
                f"{step:<8} {_fmt(v['wall_s']):>7} {_fmt(v['rss_mib']):>7} {_fmt(v['repo_mb']):>7}"
            )


def evaluate_targets(ratios: dict[str, Any]) -> list[str]:
    """The targets of bench/README.md, judged against restic's medians of this run."""
    r = ratios.get("safehold/restic")
    if not r:
        return []
    out = ["", "== targets (safehold vs restic, this run) =="]

    def judge(label: str, value: float | None, limit: float) -> None:
        if value is None:
            out.append(f"{label:<44} n/a")
        else:
            verdict = "PASS" if value <= limit else "FAIL"
            out.append(f"{label:<44} {value:6.2f} (<= {limit:.2f})  {verdict}")

    judge("first backup wall time ratio", r.get("backup1", {}).get("wall_s"), 1.0)
    judge("restore wall time ratio", r.get("restore", {}).get("wall_s"), 1.0)
    judge("unchanged re-backup wall time ratio", r.get("backup2", {}).get("wall_s"), 0.5)
    judge("repo size ratio after backup3", r.get("backup3", {}).get("repo_mb"), 1.0)
    rss = [v["rss_mib"] for v in r.values() if v.get("rss_mib") is not None]
    judge("peak RSS ratio (worst step)", max(rss) if rss else None, 1.0)
    return out


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--size-mb", type=float, default=1024, help="corpus size in MiB (default 1024)")
    ap.add_argument(
        "--runs", type=int, default=3, help="repetitions, medians are reported (default 3)"
    )
    ap.add_argument(
        "--tools",
        default="safehold,restic,borg",
        help="comma-separated subset of: " + ",".join(TOOLS) + " (default: all)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "safehold-bench",
        help="corpus cache, source copy, repos, restores, logs, results.json "
        "(default: %(default)s)",
    )
    ap.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    ap.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="do not drop the page cache before each timed step (it is dropped only as root)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the source copy, repos and restores")
    ap.add_argument(
        "--s3",
        action="store_true",
        help="store the repositories in a local moto_server (S3) instead of folders "
        "(safehold and restic only)",
    )
    a = ap.parse_args(argv)
    if a.runs < 1 or a.size_mb <= 0:
        ap.error("--runs and --size-mb must be positive")
    names = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = [t for t in names if t not in TOOLS]
    if unknown or not names:
        ap.error(f"unknown tool(s) {', '.join(unknown) or '(none)'}; known: {', '.join(TOOLS)}")
    a.tool_names = list(dict.fromkeys(names))
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tools: list[Tool] = []
    for name in args.tool_names:
        tool = TOOLS[name](work)
        if tool.exe is None:
            print(f"# skipping {name}: '{tool.binary}' not found (install: {tool.install_hint})")
        else:
            tools.append(tool)
    if not tools:
        print("# nothing to benchmark: none of the tools is installed", file=sys.stderr)
        return 2
    if not shutil.which("cp"):
        print("# error: 'cp' (coreutils) is needed to copy the corpus", file=sys.stderr)
        return 2
    s3 = None
    if args.s3:
        skipped = [t.name for t in tools if not t.supports_s3]
        if skipped:
            print(f"# skipping {', '.join(skipped)}: no S3 support")
        tools = [t for t in tools if t.supports_s3]
        s3 = S3Server(work / "moto.log")
        Tool.s3 = s3
        print(f"# repositories in S3 buckets of a moto_server at {s3.url}")
    bench = Bench(args, work, tools, CacheDropper(not args.no_drop_caches))
    try:
        results = bench.main()
    finally:
        if s3 is not None:
            s3.stop()
    # the exit status judges safehold when it ran, else every tool
    judged = {"safehold"} if any(t.name == "safehold" for t in tools) else {t.name for t in tools}
    failed = sorted({m.tool for m in bench.measures if not m.ok and m.tool in judged})
    different = sorted({v["tool"] for v in results["verify"] if not v["identical"]} & judged)
    if failed or different:
        print(
            f"# failed: {', '.join(failed) or '-'}; restore differs: {', '.join(different) or '-'}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
