"""The suite's own switches (tests/conftest.py), run in a pytest subprocess on a copy of the
conftest whose ``../shared/data`` is absent: data tests skip, or fail under
``RNNLM_REQUIRE_DATA=1`` (what ``.ci/run`` sets); ``cuda`` tests skip without a GPU."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest

def test_needs_wikitext2(wikitext2):
    assert (wikitext2 / "train.txt").is_file()

@pytest.mark.cuda
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()

def test_plain():
    pass
'''


def run_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    repo = tmp_path / "checkout" / "repo"  # its ../shared/data does not exist
    (repo / "tests").mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", repo / "tests" / "conftest.py")
    shutil.copy(TESTS.parent / "pyproject.toml", repo / "pyproject.toml")  # the markers
    (repo / "tests" / "test_probe.py").write_text(PROBE)
    full_env = {k: v for k, v in os.environ.items() if k != "RNNLM_REQUIRE_DATA"} | env
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider", "tests"],
                          cwd=repo, env=full_env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe's cuda test would run")
def test_absent_data_skips_by_default(tmp_path):
    proc = run_probe(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed, 2 skipped" in proc.stdout
    assert "wikitext-2/train.txt is absent" in proc.stdout and "needs a CUDA GPU" in proc.stdout


@pytest.mark.parametrize("value", ["1"])
def test_absent_data_fails_when_required(tmp_path, value):
    proc = run_probe(tmp_path, RNNLM_REQUIRE_DATA=value)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "ERROR tests/test_probe.py::test_needs_wikitext2" in proc.stdout  # a failing fixture: an error
    assert "RNNLM_REQUIRE_DATA is set, so this is a failure, not a skip" in proc.stdout


def test_require_data_zero_means_off(tmp_path):
    proc = run_probe(tmp_path, RNNLM_REQUIRE_DATA="0")
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout[-2000:]


def test_ci_requires_the_data():
    assert "RNNLM_REQUIRE_DATA=1 python3 -m pytest" in (TESTS.parent / ".ci" / "run").read_text()
