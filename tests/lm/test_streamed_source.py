"""lm.train from a streamed source (``data.stream.enabled``): no prepared Arrow copy, rows
encoded on the fly with a given tokenizer, length-bucketed in a bounded buffer; it trains,
validates over every validation token, and resumes mid-epoch exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import lm.train
from lm.config import load
from pipeline.data import TokenDataset

from .test_train import assert_same, records

STREAMED = {"stream": {"enabled": True, "buffer_size": 64}}


@pytest.fixture
def streamed_recipe(toy_recipe, toy_prepared, tmp_path):
    """The toy corpus streamed with the prepared folder's tokenizer (so ids compare), output elsewhere."""
    def make(name: str, **train):
        data = {**STREAMED, "tokenizer": {"path": str(toy_prepared / "tokenizer.json")},
                "output": str(tmp_path / "never_written")}
        return toy_recipe(name, data=data, train={"epochs": None, **train})
    return make


def test_trains_from_the_stream_without_preparing(streamed_recipe, toy_prepared, tmp_path):
    path = streamed_recipe("s", max_steps=20, eval_every=10)
    result = lm.train.run(load(path))
    assert not (tmp_path / "never_written").exists()  # nothing prepared
    vals = records(path.parent / "s", "validation")
    want = TokenDataset(toy_prepared, "validation").num_tokens
    # every 10 steps, and at the end of the first pass over the stream (15 batches of the toy train split)
    assert [r["step"] for r in vals] == [10, 15, 20] and all(r["tokens"] == want for r in vals)
    assert result["val_tokens"] == want and result["test_tokens"] == TokenDataset(toy_prepared, "test").num_tokens
    assert vals[2]["ppl"] < vals[0]["ppl"]
    train = records(path.parent / "s", "train")
    assert train[-1]["tokens"] == result["tokens"] > 0


def test_epochs_end_with_the_stream_and_resume_mid_epoch_is_exact(streamed_recipe):
    straight = streamed_recipe("a", max_steps=18, checkpoint_every=6)
    lm.train.run(load(straight))
    b = streamed_recipe("b", max_steps=6)
    lm.train.run(load(b))
    lm.train.run(load(b, ["train.max_steps=18", "train.resume=auto"]))
    from lm import checkpoint

    ca = checkpoint.load(straight.parent / "a" / "checkpoints" / "step-00000018.pt")
    cb = checkpoint.load(b.parent / "b" / "checkpoints" / "step-00000018.pt")
    for key in ("model", "optimizer", "rng"):
        assert_same(ca[key], cb[key], key)
    assert ca["progress"]["epoch"] == cb["progress"]["epoch"] >= 1  # the toy stream is ~13 batches: epochs ended
    assert json.dumps(ca["data"], sort_keys=True, default=str) == json.dumps(cb["data"], sort_keys=True, default=str)


def test_stream_mode_needs_prepared_data(streamed_recipe):
    path = streamed_recipe("m", max_steps=2, mode="stream", max_tokens=None, batch_size=4)
    with pytest.raises(lm.train.UserError, match="train.mode=stream reads prepared data"):
        lm.train.run(load(path))


def test_two_ranks_train_from_the_stream_and_resume(streamed_recipe, toy_prepared, lm_env):
    """torchrun, 2 ranks, a streamed source: each rank batches its own shard, every epoch ends
    for both at the first rank's end (no hang), a step's tokens are both ranks' batches, the
    validation reads every row once across ranks, and a resume mid-epoch on 2 ranks ends where
    the straight run does."""
    import subprocess
    import sys

    from lm import checkpoint
    from pipeline.collate import PackedCollator
    from pipeline.streaming import StreamBucketBatcher, open_stream

    def torchrun(path, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lm.train", str(path), *extra]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=lm_env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    steps = 12
    straight = streamed_recipe("a", max_steps=steps, checkpoint_every=6)
    proc = torchrun(straight)
    assert "| world 2" in proc.stderr and "replicas diverged" not in proc.stderr
    result = json.loads((straight.parent / "a" / "result.json").read_text())

    # what the trainer's batchers give, rank by rank: each epoch stops at the shorter rank's end
    recipe = load(straight)
    cfg = recipe.train
    splits, _ = open_stream(recipe.data)
    collate, want, left, epoch = PackedCollator(pad_id=0), 0, steps, 0
    while left:
        ranks = []
        for rank in (0, 1):
            b = StreamBucketBatcher(splits["train"], max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                                    buffer_size=recipe.data.stream.buffer_size, seed=cfg.seed, num_replicas=2, rank=rank)
            b.set_epoch(epoch)
            ranks.append([int(collate(rows).num_tokens) for rows in b])
        n = min(left, *map(len, ranks))
        want += sum(sum(r[:n]) for r in ranks)
        left, epoch = left - n, epoch + 1
    assert epoch >= 2  # the run crossed an epoch's uneven end
    assert result["steps"] == steps and result["tokens"] == want
    val = TokenDataset(toy_prepared, "validation").num_tokens
    assert result["val_tokens"] == val and all(r["tokens"] == val for r in records(straight.parent / "a", "validation"))

    split = streamed_recipe("b", max_steps=steps // 2 + 1, checkpoint_every=6)  # stops mid-epoch
    torchrun(split)
    torchrun(split, f"train.max_steps={steps}", "train.resume=auto")
    ca = checkpoint.load(straight.parent / "a" / "checkpoints" / f"step-{steps:08d}.pt")
    cb = checkpoint.load(split.parent / "b" / "checkpoints" / f"step-{steps:08d}.pt")
    for key in ("model", "optimizer"):
        assert_same(ca[key], cb[key], key)
    assert json.loads((split.parent / "b" / "result.json").read_text())["tokens"] == want
