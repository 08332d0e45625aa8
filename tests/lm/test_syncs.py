"""Host synchronisations in the training step and in evaluation, counted.

On a GPU every ``.item()``, ``bool(tensor)``, ``float(tensor)`` of a device tensor stops the
host until the device catches up, and the host can no longer prepare the next batch. The
step is allowed exactly one (is the gradient norm finite?), evaluation one per split.

A CPU run cannot tell device tensors from host ones, so the counter watches floating-point
and boolean tensors — losses, norms, masks — and not the integer ``batch_sizes`` / lengths
that packed batches keep on the host by contract, nor the optimisers' step counters, which
torch keeps on the host (``capturable=False``) and reads in ``torch/optim``.
"""
from __future__ import annotations

import sys

import pytest
import torch

import lm.train
from lm.config import load

WATCHED = ("__bool__", "item", "__float__", "__int__", "tolist", "numpy")


@pytest.fixture
def sync_counter(monkeypatch):
    """``counter["n"]``: watched host reads since the counter was last reset (while ``counter["on"]``)."""
    counter = {"n": 0, "on": False}
    for name in WATCHED:
        real = getattr(torch.Tensor, name)

        def watched(self, *args, _real=real, **kwargs):
            if counter["on"] and (self.dtype.is_floating_point or self.dtype == torch.bool) \
                    and "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counter["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)
    return counter


@pytest.mark.parametrize("mode", ["sequence", "stream"])
def test_a_training_step_syncs_once_and_an_evaluation_once(toy_recipe, monkeypatch, sync_counter, mode):
    train = {"epochs": None, "max_steps": 6, "log_every": 1000, "progress_every": 1e6, "schedule": "constant",
             **({"mode": "stream", "max_tokens": None, "batch_size": 4, "bptt": 8} if mode == "stream" else {})}
    path = toy_recipe(mode, model={"cell": "lstm", "num_layers": 2, "dropout_rnn": 0.1, "weight_drop": 0.2,
                                   "locked_dropout": True, "dropout_emb": 0.1}, train=train)
    per_step, per_eval = [], []
    real_step, real_eval = lm.train._step, lm.train.evaluate

    def counted(log, real):
        def wrapper(*args, **kwargs):
            sync_counter.update(n=0, on=True)
            try:
                return real(*args, **kwargs)
            finally:
                sync_counter["on"] = False
                log.append(sync_counter["n"])
        return wrapper

    monkeypatch.setattr(lm.train, "_step", counted(per_step, real_step))
    monkeypatch.setattr(lm.train, "evaluate", counted(per_eval, real_eval))
    lm.train.run(load(path))
    assert per_step == [1] * 6  # isfinite(grad_norm)
    assert len(per_eval) == 2 and per_eval == [1, 1]  # validation, test: the summed NLL, once each
