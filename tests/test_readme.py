"""Every ```python block of README.md runs on its own, as a reader would paste it: each in a
fresh interpreter (no state shared between blocks), from the repository root."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced ```python block."""
    return [(markdown.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(markdown)]


BLOCKS = python_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))


def test_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\nz = 3\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (8, "y = 2\nz = 3\n")]
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def runs() -> dict[int, subprocess.Popen]:
    """Every block started at once (each pays its own imports): line -> finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    procs = {line: subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for line, code in BLOCKS}
    for p in procs.values():
        try:
            p.stdout_text, p.stderr_text = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.stdout_text, p.stderr_text = p.communicate()
    return procs


@pytest.mark.parametrize("line", [n for n, _ in BLOCKS], ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs_on_its_own(line, runs):
    proc = runs[line]
    assert proc.returncode == 0, f"README.md:{line}\n{proc.stderr_text[-3000:]}"
