"""bench/results.py: RESULTS.md rows come from run folders' result.json, never typed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_results", REPO_ROOT / "bench" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

RESULT = {"command": "python -m lm.train recipes/zaremba_small.yaml", "mode": "stream", "best_val_ppl": 121.456,
          "val_tokens": 73760, "test_ppl": 116.0449, "test_tokens": 82430, "parameters": 4654002,
          "train_seconds": 1500.0, "epochs": 13, "steps": 30212, "stopped_by": "epochs", "tokens_per_s": 9123.4,
          "device": "cpu", "hardware": "2 cores", "torch": "2.13.0"}


def _run(folder: Path, result: dict, anchor: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))
    if anchor is not None:
        (folder / "anchor.json").write_text(json.dumps(anchor))
    return folder


def test_a_row_holds_the_run_figures_and_the_published_reference(tmp_path, capsys):
    run = _run(tmp_path / "z", RESULT)
    assert results.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert ("| `recipes/zaremba_small.yaml` | stream | 121.46 (73,760) | 116.04 (82,430) | 120.7 / 114.5 "
            "(Zaremba et al. 2014, Table 1, non-regularized LSTM) | 4,654,002 | 25.0 min (13 epochs, 30,212 steps, epochs) "
            "| 9,123 | cpu: 2 cores, torch 2.13.0 |") in out
    assert "- `python -m lm.train recipes/zaremba_small.yaml`" in out
    assert "no run here yet" not in out


def test_a_bench_runs_anchor_is_the_reference_and_its_command_is_shown(tmp_path, capsys):
    ours = {**RESULT, "command": "python -m lm.train recipes/ptex_wikitext2.yaml train.epochs=1", "best_val_ppl": 250.0}
    anchor = {"what": "pytorch/examples main.py defaults, same run", "val_ppl": 258.4, "test_ppl": 243.21,
              "tokens_per_s": 1400.4, "command": "python shared/anchors/ptex_epoch.py DATA 1"}
    run = _run(tmp_path / "p", ours, anchor)
    results.main([str(run)])
    out = capsys.readouterr().out
    assert "| 250.00 (73,760) |" in out
    assert "| 258.40 / 243.21 (pytorch/examples main.py defaults, same run; 1,400 tokens/s) |" in out
    assert "(its reference, in the same bench run: `python shared/anchors/ptex_epoch.py DATA 1`)" in out
    assert "`recipes/zaremba_small.yaml` (Zaremba et al. 2014" in out  # still listed as not yet run
