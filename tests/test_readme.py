"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs() -> None:
    text = README.read_text()
    section = text.split("## As a library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README has no library example"
    code = match.group(1)
    assert "Repository.init" in code and "restore(" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


def test_readme_names_the_test_command_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci
    assert "bash scripts/test" in README.read_text()
