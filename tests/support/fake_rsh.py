"""A stand-in for ``ssh`` in tests of ``ssh://`` repositories: it runs ``safehold serve`` locally
over the same pipes, as an ``authorized_keys`` forced command would, ignoring the command the
client asked for. The restriction comes from FAKE_RSH_ROOT, --append-only from
FAKE_RSH_APPEND_ONLY=1. Use it as ``SAFEHOLD_RSH="python tests/support/fake_rsh.py"``."""

from __future__ import annotations

import os
import sys


def main() -> None:
    args = [
        sys.executable,
        "-m",
        "safehold",
        "serve",
        "--restrict-to-path",
        os.environ.get("FAKE_RSH_ROOT", "/"),
    ]
    if os.environ.get("FAKE_RSH_APPEND_ONLY") == "1":
        args.append("--append-only")
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()
