"""bench/results.py: RESULTS.md rows come from run folders' result.json, never typed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
    assert "no run in this table" not in out


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


def _budget_run(tmp_path: Path, minutes: int, val: float, **over) -> Path:
    cmd = (f"python -m lm.train recipes/wikitext.yaml data.source.dir=D train.output_dir=runs/cpu_{minutes}min "
           f"train.max_time={minutes * 60} train.plot=false")
    res = {**RESULT, "command": cmd, "best_val_ppl": val, "train_seconds": minutes * 60.0,
           "tokens": minutes * 1_000_000, **over}
    return _run(tmp_path / f"cpu_{minutes}min", res)


def test_per_minute_rows_come_shortest_budget_first_with_their_commands(tmp_path, capsys):
    runs = [_budget_run(tmp_path, m, v) for m, v in ((20, 112.5), (5, 160.25), (10, 130.0))]
    z = _run(tmp_path / "z", RESULT)
    assert results.main([str(z), "--per-minute", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "--per-minute " + " ".join(map(str, runs)) + "`" in out.splitlines()[2]
    assert "## Quality per CPU minute: `recipes/wikitext.yaml`, stream protocol" in out
    table = out.split("## Quality per CPU minute", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and " min |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 5 min", "| 10 min", "| 20 min"]
    assert rows[0] == ("| 5 min | 160.25 (73,760) | 116.04 (82,430) | 5,000,000 | 13 | 30,212 | 9,123 "
                       "| cpu: 2 cores, torch 2.13.0 |")
    cmds = [line for line in table.splitlines() if line.startswith("- `")]
    assert [c.split("train.max_time=")[1].split()[0] for c in cmds] == ["300", "600", "1200"]


def test_per_minute_refuses_runs_that_differ_in_more_than_the_budget(tmp_path):
    a = _budget_run(tmp_path, 5, 160.0)
    b = _budget_run(tmp_path, 10, 130.0, command="python -m lm.train recipes/wikitext.yaml data.source.dir=D "
                    "train.output_dir=x train.max_time=600 train.plot=false train.lr=0.01")
    z = _run(tmp_path / "z", RESULT)
    with pytest.raises(SystemExit, match="must differ only in train.max_time"):
        results.main([str(z), "--per-minute", str(a), str(b)])


def test_per_minute_alone_is_a_section_of_its_own(tmp_path, capsys):
    runs = [_budget_run(tmp_path, m, v) for m, v in ((5, 160.0), (40, 101.0))]
    assert results.main(["--per-minute", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\n## Quality per CPU minute: `recipes/wikitext.yaml`, stream protocol\n")
    assert "# Results" not in out and "no run in this table" not in out
    assert "Generated by `python bench/results.py --per-minute " + " ".join(map(str, runs)) + "`" in out
    assert "| 40 min | 101.00 (73,760) |" in out
