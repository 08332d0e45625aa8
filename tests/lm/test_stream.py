"""Stream mode (the published protocol) through lm.train and lm.evaluate: exact token counts,
a carried state that makes the window length irrelevant, exact resume mid-epoch with the
carried state, and the schedule fixes (one validation per step)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import lm.train
from lm.batches import batch_source
from lm.config import TrainConfig, load
from lm.distributed import Dist
from lm.evaluate import evaluate
from lm.generate import load_model
from pipeline.data import TokenDataset

from .test_train import assert_same_training_state, batches_per_epoch, records

STREAM = {"mode": "stream", "max_tokens": None, "batch_size": 4, "bptt": 8, "eval_batch_size": 3,
          "epochs": None, "schedule": "constant"}
LSTM = {"cell": "lstm", "num_layers": 2, "dropout_emb": 0.1, "dropout_rnn": 0.2, "dropout_out": 0.1}


def stream_ppl(model, prepared, split: str, streams: int, bptt: int) -> tuple[float, int]:
    cfg = TrainConfig(mode="stream", eval_batch_size=streams, bptt=bptt)
    nll, tokens = evaluate(model, batch_source(TokenDataset(prepared, split), cfg, Dist(), train=False, pin=False),
                           torch.device("cpu"), Dist())
    return math.exp(nll / tokens), tokens


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory, recipe_writer):
    folder = tmp_path_factory.mktemp("stream")
    path = recipe_writer(folder, "run", model=LSTM, train={**STREAM, "max_steps": 30, "eval_every": 10})
    return folder / "run", lm.train.run(load(path))


def test_stream_run_counts_every_predicted_token_and_learns(stream_run, toy_prepared):
    out, result = stream_run
    val = TokenDataset(toy_prepared, "validation")
    assert result["mode"] == "stream" and result["steps"] == 30
    assert result["tokens"] == 30 * 4 * 8  # every training window is B x bptt
    vals = records(out, "validation")
    assert [r["step"] for r in vals] == [10, 20, 30]  # max_steps on an eval step: one validation, not two
    assert all(r["tokens"] == val.num_tokens for r in vals)
    assert result["test_tokens"] == TokenDataset(toy_prepared, "test").num_tokens
    assert vals[-1]["ppl"] < vals[0]["ppl"] < result["val_tokens"]  # it learns (vocab ~30: far below that)


def test_carried_state_makes_the_window_length_irrelevant(stream_run, toy_prepared):
    """One stream read in windows of 3, 8 or 1000 tokens is the same computation."""
    model, _ = load_model(str(stream_run[0] / "checkpoints" / "best.pt"))
    ppl = [stream_ppl(model, toy_prepared, "validation", 1, bptt) for bptt in (3, 8, 1000)]
    assert ppl[0][1] == ppl[1][1] == ppl[2][1] == TokenDataset(toy_prepared, "validation").num_tokens
    assert ppl[0][0] == pytest.approx(ppl[2][0], rel=1e-5) and ppl[1][0] == pytest.approx(ppl[2][0], rel=1e-5)


def test_batch_of_streams_changes_only_the_boundaries(stream_run, toy_prepared):
    """10 streams score the same tokens as 1; only the 9 extra zero-state starts differ, so
    the perplexity moves a little, and the stateless per-line protocol is further away."""
    model, _ = load_model(str(stream_run[0] / "checkpoints" / "best.pt"))
    one, n1 = stream_ppl(model, toy_prepared, "validation", 1, 8)
    ten, n10 = stream_ppl(model, toy_prepared, "validation", 10, 8)
    assert n1 == n10
    assert ten == pytest.approx(one, rel=0.03)
    assert ten != one


def test_stream_resume_mid_epoch_is_bit_identical(toy_recipe, toy_prepared):
    """7 windows, stop, resume to 14 == 14 straight: model, optimiser, position and the
    carried state itself."""
    per_epoch = TokenDataset(toy_prepared, "train").num_tokens // 4 // 8 + 1
    assert per_epoch > 14  # the stop and the resume both land mid-epoch
    a = toy_recipe("a", model=LSTM, train=STREAM)
    b = toy_recipe("b", model=LSTM, train=STREAM)
    lm.train.run(load(a, ["train.max_steps=14"]))
    lm.train.run(load(b, ["train.max_steps=7"]))
    lm.train.run(load(b, ["train.max_steps=14", "train.resume=auto"]))
    ck = "checkpoints/step-00000014.pt"
    assert_same_training_state(a.parent / "a" / ck, b.parent / "b" / ck)
    from lm import checkpoint

    carry = checkpoint.load(a.parent / "a" / ck)["carry"]
    assert len(carry) == 1 and carry[0][0].shape == (2, 4, 16) and carry[0][0].abs().sum() > 0


def test_one_validation_per_step_so_plateau_does_not_cut_an_improving_rate(toy_recipe, toy_prepared):
    """eval_every landing on the epoch end used to validate twice; the second call saw no
    improvement and the plateau schedule cut the rate while validation improved."""
    n = batches_per_epoch(toy_prepared)
    path = toy_recipe("plateau", train={"schedule": "plateau", "eval_every": n, "epochs": 2, "lr": 0.01})
    lm.train.run(load(path))
    vals = records(path.parent / "plateau", "validation")
    assert [r["step"] for r in vals] == [n, 2 * n]
    assert all(r["best"] for r in vals)  # validation improved both times...
    lrs = {r["step"]: r["lr"] for r in records(path.parent / "plateau", "train")}
    assert lrs[2 * n] == 0.01  # ...so the rate was never cut


def test_cosine_with_only_a_time_budget_runs(toy_recipe):
    path = toy_recipe("cos", train={"schedule": "cosine", "epochs": None, "max_time": 2.0, "warmup_steps": 2})
    result = lm.train.run(load(path))
    assert result["stopped_by"] == "max_time" and result["steps"] > 2
    lrs = [r["lr"] for r in records(path.parent / "cos", "train")]
    assert lrs[0] == pytest.approx(0.005) and lrs[-1] < lrs[2]


def test_lm_evaluate_on_a_split_and_on_the_same_text_file(stream_run, toy_prepared, toy_corpus, lm_env, tmp_path):
    best = stream_run[0] / "checkpoints" / "best.pt"
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "lm.evaluate", str(best), "--split", "test",
                           "--file", str(toy_corpus / "test.txt"), "--batch-size", "1", "--output", str(out)],
                          env=lm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    split, file = json.loads(out.read_text())
    test = TokenDataset(toy_prepared, "test")
    assert split["tokens"] == file["tokens"] == test.num_tokens
    assert split["nll"] == pytest.approx(file["nll"], rel=1e-9)  # the file encodes to the same stream
    text = (toy_corpus / "test.txt").read_text()
    assert file["bits_per_char"] == pytest.approx(file["nll"] / math.log(2) / len(text), rel=1e-12)
    assert file["bits_per_byte"] == pytest.approx(file["nll"] / math.log(2) / len(text.encode()), rel=1e-12)
    model, _ = load_model(str(best))
    ppl, _ = stream_ppl(model, toy_prepared, "test", 1, 8)
    assert split["ppl"] == pytest.approx(ppl, rel=1e-9)
    assert "stream protocol" in proc.stderr
