"""WikiText-2 at its real size: the prepared vocabulary (33,278 output classes) through an
adaptive-softmax RNNLM — exact parameter count, every cluster hit by real targets, a finite
loss that falls under training. CPU; needs ../shared/data (skips, or fails in CI)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lm.config import ModelConfig
from lm.model import build_model
from pipeline.collate import PackedCollator
from pipeline.data import TokenDataset, read_manifest
from pipeline.sampling import BucketBatchSampler

CUTOFFS = [2000, 10000]
E = H = 32


def expected_parameters(V: int) -> int:
    """Embedding + one LSTM layer + nn.AdaptiveLogSoftmaxWithLoss (div_value 4, no biases), by hand."""
    lstm = 4 * H * (E + H + 2)
    c = [*CUTOFFS, V]
    head = H * (c[0] + len(c) - 1)  # shortlist + one logit per tail cluster
    tails = sum(H * (H // 4 ** (i + 1)) + (H // 4 ** (i + 1)) * (c[i + 1] - c[i]) for i in range(len(c) - 1))
    return V * E + lstm + head + tails


@pytest.mark.slow
def test_adaptive_softmax_on_the_real_wikitext2_vocabulary(wikitext2_prepared):
    V = read_manifest(wikitext2_prepared)["vocab_size"]
    assert V == 33278 + 2  # the 33,278 classes (<eos> and <unk> included) plus <pad> and <bos>
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell="lstm", embed_dim=E, hidden_size=H, num_layers=1, adaptive_cutoffs=CUTOFFS,
                                    dropout_emb=0.0, dropout_rnn=0.0, dropout_out=0.0), V)
    assert model.num_parameters() == expected_parameters(V) == 1_248_352  # 1,064,960 + 8,448 + 64,064 + 64,256 + 46,624

    train = TokenDataset(wikitext2_prepared, "train")
    loader = DataLoader(train, batch_sampler=BucketBatchSampler(train.lengths, max_tokens=4096, seed=0),
                        collate_fn=PackedCollator(pad_id=0))
    batch = next(iter(loader))
    targets = batch.targets.data
    assert (targets < CUTOFFS[0]).any() and ((targets >= CUTOFFS[0]) & (targets < CUTOFFS[1])).any() and (targets >= CUTOFFS[1]).any()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(10):
        out = model(batch, need_state=False, need_logits=False)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(V)) < 1.0  # near uniform at initialisation
    assert losses[-1] < losses[0] - 1.0  # it learns the unigram distribution first
