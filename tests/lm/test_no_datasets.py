"""The trainer on prepared data with `datasets` blocked, as on a GPU machine that lacks it
(bench/gpu.py's blocker)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py)


def test_training_on_prepared_data_without_datasets(recipe_writer, tmp_path, lm_env):
    """The whole trainer, `datasets` blocked, on data prepared beforehand (a cache hit)."""
    path = recipe_writer(tmp_path, "nods", train={"epochs": 1})
    code = gpu.NO_DATASETS + f"import runpy\nsys.argv = ['lm.train', {str(path)!r}]\nrunpy.run_module('lm.train', run_name='__main__')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=lm_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "nods" / "result.json").read_text())
    assert result["epochs"] == 1 and result["test_ppl"] > 1
