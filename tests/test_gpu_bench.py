"""bench/gpu.py without a GPU: the dry run finds a staged folder (re-keying prepared data that
moved with its checkout), names what is missing; the trainer's imports need no `datasets`
(tests/lm/test_no_datasets.py trains with it blocked)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_import_chain_of_the_trainer_does_not_import_datasets():
    code = gpu.NO_DATASETS + "import lm.train, lm.generate, lm.precision, pipeline.prepare\nprint('datasets' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_the_blocker_blocks():
    code = gpu.NO_DATASETS + "import datasets\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "datasets is blocked: the GPU machine has no datasets" in proc.stderr


def test_dry_run_names_what_is_missing(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--dir", str(tmp_path / "empty"),
                           "--shared", str(tmp_path / "none")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    err = proc.stderr
    assert "missing: no anchors/ptex_like.py" in err and "missing: no raw WikiText-2" in err
    assert "missing: no prepared data" in err and "run `python bench/gpu.py --stage`" in err
    assert "dry run: 4 problem(s)" in err  # the three above and the prepare probe (no data to hit)


@pytest.mark.slow
def test_dry_run_ready_after_the_checkout_moved(wikitext2, wikitext2_prepared, tmp_path, shared_data):
    """A staged folder whose prepared data was built from the same bytes at another path."""
    staged = tmp_path / "gpu_data"
    shutil.copytree(wikitext2, staged / "wikitext-2")
    shutil.copytree(wikitext2_prepared, staged / "wt2")
    before = json.loads((staged / "wt2" / "manifest.json").read_text())["fingerprint"]
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--dir", str(staged), "--shared", str(shared_data.parent)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok: prepared data: re-keyed to this checkout's paths (same source bytes)" in proc.stderr
    assert "ok: lm.train + prepared-data cache hit: no `datasets` imported" in proc.stderr and "dry run: ready" in proc.stderr
    assert json.loads((staged / "wt2" / "manifest.json").read_text())["fingerprint"] != before

    (staged / "wikitext-2" / "train.txt").write_text("other text\n")  # not the bytes it was built from
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--dir", str(staged), "--shared", str(shared_data.parent)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "is not the file" in proc.stderr and "run --stage again" in proc.stderr
