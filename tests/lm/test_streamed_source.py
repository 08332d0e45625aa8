"""lm.train from a streamed source (``data.stream.enabled``): no prepared Arrow copy, rows
encoded on the fly with a given tokenizer, length-bucketed in a bounded buffer; it trains,
validates over every validation token, and resumes mid-epoch exactly."""
from __future__ import annotations

import json

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
