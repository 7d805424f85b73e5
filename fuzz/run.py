"""The long mode of the parser fuzz targets (tests/fuzz): the same targets, many more examples,
fresh random inputs each run.

    python fuzz/run.py --examples 100000            # every target
    python fuzz/run.py --examples 20000 -k envelope  # some of them (a pytest -k expression)

CI runs tests/fuzz with a fixed, small number of examples per target (derandomized).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000, help="examples per target")
    ap.add_argument("-k", dest="select", default="", help="a pytest -k expression")
    ap.add_argument("--runxfail", action="store_true", help="also run the known failures")
    a = ap.parse_args(argv)
    env = os.environ | {"SAFEHOLD_FUZZ_EXAMPLES": str(a.examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz"]
    if a.select:
        cmd += ["-k", a.select]
    if a.runxfail:
        cmd.append("--runxfail")
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
