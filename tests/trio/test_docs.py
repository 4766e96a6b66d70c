"""The complete example in docs/trio.md runs as it is written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_complete_example_in_docs_runs() -> None:
    page = (ROOT / "docs" / "trio.md").read_text()
    example = re.findall(r"```python\n(.*?)```", page, re.DOTALL)[0]
    done = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "21.5 C\n"
    assert done.stderr == ""
