"""DDP in stream mode: ``torchrun --nproc_per_node 2`` gives each rank its own contiguous
block of streams, both take the same number of equal windows, the token count is global, the
replicas stay identical, the validation perplexity is the one a single process computes over
the same streams, and a resume on the same number of ranks continues each rank's carried state."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm.generate
from lm import checkpoint
from lm.batches import batch_source
from lm.config import TrainConfig
from lm.distributed import Dist
from lm.evaluate import evaluate
from pipeline.data import TokenDataset

REPO_ROOT = Path(__file__).resolve().parents[2]
STREAM = {"mode": "stream", "max_tokens": None, "batch_size": 4, "bptt": 8, "eval_batch_size": 4,
          "epochs": None, "schedule": "constant"}


def torchrun(path: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lm.train", str(path), *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_two_ranks_stream_mode_and_resume(toy_recipe, toy_prepared, lm_env):
    path = toy_recipe("ddp", model={"cell": "lstm", "num_layers": 2, "dropout_rnn": 0.1},
                      train={**STREAM, "max_steps": 4, "checkpoint_every": 2})
    proc = torchrun(path, env=lm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| world 2" in proc.stderr and "replicas diverged" not in proc.stderr
    out = path.parent / "ddp"
    result = json.loads((out / "result.json").read_text())
    assert result["tokens"] == 4 * 4 * 8  # 4 steps of 4 streams (2 per rank) x 8 tokens
    ck = checkpoint.load(out / "checkpoints" / "step-00000004.pt")
    assert ck["world"] == 2 and len(ck["carry"]) == 2  # each rank's carried state
    assert not torch.equal(ck["carry"][0][0], ck["carry"][1][0])  # different streams, different states

    # validation: 4 streams, 2 per rank, summed over ranks == one process reading all 4
    (val,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "validation"]
    model, _ = lm.generate.load_model(str(out / "checkpoints" / "step-00000004.pt"))
    data = batch_source(TokenDataset(toy_prepared, "validation"), TrainConfig(**{**STREAM, "max_steps": 4}), Dist(),
                 train=False, pin=False)
    nll, tokens = evaluate(model, data, torch.device("cpu"), Dist())
    assert val["tokens"] == tokens == TokenDataset(toy_prepared, "validation").num_tokens
    assert val["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)

    # the same ranks continue; another number of ranks is refused (carried states are per rank)
    proc = torchrun(path, "train.max_steps=6", "train.resume=auto", env=lm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert json.loads((out / "result.json").read_text())["tokens"] == 6 * 4 * 8
    one = subprocess.run([sys.executable, "-m", "lm.train", str(path), "train.max_steps=8", "train.resume=auto"],
                         cwd=REPO_ROOT, env=lm_env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "resume it with the same number of processes (now 1)" in one.stderr.splitlines()[-1]
