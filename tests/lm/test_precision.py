"""Mixed-precision policy: the table for every option/device/cuDNN version, the recipe key,
the RNN leaving autocast, and a CPU bf16 training step that stays close to fp32."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from lm import precision
from lm.config import load
from lm.model import RNNLM
from lm.precision import FP32GRU, FP32LSTM, FP32RNN, choose
from pipeline.collate import PackedCollator
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (amp, device, cuDNN) -> (autocast dtype, RNN dtype, GradScaler, TF32)
TABLE = [
    ("off", "cuda", 91300, None, FP32, False, False),
    ("off", "cpu", None, None, FP32, False, False),
    ("auto", "cuda", 90100, BF16, FP32, False, True),
    ("auto", "cuda", 91300, BF16, FP32, False, True),  # bf16 cuDNN RNNs exist, but need bf16 weights
    ("auto", "cuda", None, BF16, FP32, False, True),
    ("auto", "cpu", None, None, FP32, False, False),  # CPU bf16 is opt-in
    ("auto", "mps", None, None, FP32, False, False),
    (True, "cuda", 90100, BF16, FP32, False, True),
    (False, "cuda", 90100, None, FP32, False, False),
    ("bf16", "cuda", 8902, BF16, FP32, False, True),
    ("bf16", "cuda", 91400, BF16, FP32, False, True),
    ("bf16", "cpu", None, BF16, FP32, False, False),
    ("fp16", "cuda", 90100, FP16, FP16, True, True),  # autocast's cuDNN wrapper: fp16 RNN, so a scaler
    ("fp16", "cuda", None, FP16, FP32, True, True),
]


@pytest.mark.parametrize("amp, device, cudnn, dtype, rnn_dtype, scaler, tf32", TABLE)
def test_policy_table(amp, device, cudnn, dtype, rnn_dtype, scaler, tf32):
    p = choose(amp, device, cudnn)
    assert (p.device_type, p.dtype, p.rnn_dtype, p.scaler, p.tf32) == (device, dtype, rnn_dtype, scaler, tf32)
    assert p.description.startswith("precision: ") and "\n" not in p.description
    # the invariant the table exists for: an RNN in fp16 always has loss scaling
    assert p.scaler == (FP16 in (p.dtype, p.rnn_dtype))
    assert p.rnn_outside_autocast == (dtype is not None and rnn_dtype == FP32)


def test_policy_description_names_the_cudnn_version():
    assert "cuDNN 91300; cuDNN >= 9.13 has bf16 RNN kernels, but only for bf16 weights" in choose("bf16", "cuda", 91300).description
    assert "cuDNN 90100; bf16 RNNs need cuDNN >= 9.13" in choose("bf16", "cuda", 90100).description
    assert "GradScaler" in choose("fp16", "cuda", 90100).description


@pytest.mark.parametrize("amp, device, match", [
    ("fp16", "cpu", "amp=fp16 is for CUDA"),
    ("bf16", "mps", "not supported on mps"),
    ("fp32", "cuda", "expected one of auto, off, bf16, fp16"),
])
def test_policy_refuses(amp, device, match):
    with pytest.raises(ValueError, match=match):
        choose(amp, device, None)


def test_for_device_on_cpu_reads_no_cudnn():
    assert choose("bf16", "cpu", None) == precision.for_device("bf16", torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:.*GradScaler is enabled, but CUDA is not available:UserWarning")
def test_grad_scaler_is_a_pass_through_unless_needed():
    s = choose("bf16", "cpu", None).grad_scaler()
    assert not s.is_enabled()
    loss = torch.tensor(3.0, requires_grad=True)
    assert s.scale(loss) is loss
    assert choose("fp16", "cuda", 90100).grad_scaler().is_enabled() == torch.cuda.is_available()  # torch disables it without CUDA


# ------------------------------------------------------------------------ the recipe key


@pytest.mark.parametrize("yaml_value, want", [("off", "off"), ("on", "auto"), ("true", "auto"), ("false", "off"),
                                              ("bf16", "bf16"), ("fp16", "fp16"), ("auto", "auto")])
def test_recipe_amp_key_and_boolean_aliases(tmp_path, yaml_value, want):
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["train"].pop("amp", None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("train:\n", f"train:\n  amp: {yaml_value}\n", 1))
    assert load(path).train.amp == want  # YAML's unquoted off/on are booleans: aliases
    assert load(path, [f"train.amp={want}"]).train.amp == want


def test_recipe_amp_key_refuses_other_values():
    with pytest.raises(UserError, match=re.escape("train.amp=fp32: expected 'auto' | 'off' | 'bf16' | 'fp16' | bool")):
        load(REPO / "recipes" / "tiny.yaml", ["train.amp=fp32"])


# ------------------------------------------------------------------ the RNN leaves autocast


@pytest.mark.parametrize("cls, fp32_cls", [(nn.LSTM, FP32LSTM), (nn.GRU, FP32GRU), (nn.RNN, FP32RNN)])
def test_apply_runs_the_rnn_in_fp32_inside_autocast(cls, fp32_cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(8, 8, 2))
    keys = list(model.state_dict())
    x = torch.randn(6, 3, 8)  # (T, B, E) padded: CPU autocast runs nn.LSTM on it in bf16
    ref, _ = model[0](x)
    policy = choose("bf16", "cpu", None)
    with policy.autocast():
        before, _ = model[0](x)
    assert policy.apply(model) is model and type(model[0]) is fp32_cls
    policy.apply(model)  # idempotent
    assert type(model[0]) is fp32_cls and isinstance(model[0], cls) and list(model.state_dict()) == keys
    with policy.autocast():
        after, _ = model[0](x.bfloat16())  # also a bf16 input is run in fp32
        packed, _ = model[0](pack_sequence([x[:, 0], x[:4, 1]]))
    assert after.dtype == FP32 and packed.data.dtype == FP32
    torch.testing.assert_close(after, ref, atol=2e-2, rtol=0)  # the input went through bf16 once
    with policy.autocast():
        exact, _ = model[0](x)
    assert torch.equal(exact, ref)  # fp32 input: bit-identical to no autocast
    if cls is nn.LSTM:
        assert before.dtype == BF16  # what the policy prevents: the RNN silently in reduced precision


def test_apply_without_autocast_changes_nothing():
    model = nn.Sequential(nn.LSTM(4, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 20, [5]))
    choose("off", "cpu", None).apply(model)
    assert [type(m) for m in model] == [nn.LSTM, nn.AdaptiveLogSoftmaxWithLoss]


@pytest.mark.parametrize("amp, rnn", [("bf16", FP32LSTM), ("fp16", nn.LSTM)])
def test_apply_for_cuda_policies_swaps_the_right_modules(amp, rnn, monkeypatch):
    """(On CPU tensors: only which classes each CUDA policy installs, and its TF32 flags.)"""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = nn.Sequential(nn.LSTM(4, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 20, [5]))
    choose(amp, "cuda", 90100).apply(model)
    assert [type(m) for m in model] == [rnn, precision.FP32AdaptiveLogSoftmaxWithLoss]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# -------------------------------------------------------------- a training step in CPU bf16


def _step(model: RNNLM, batch, policy, **kw) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with policy.autocast():
        out = model(batch, need_state=False, need_logits=False, **kw)
    scaler = policy.grad_scaler()
    scaler.scale(out.nll_sum / out.num_tokens).backward()
    return out.loss.item(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _model_and_batch(cell: str, **kw):
    torch.manual_seed(0)
    vocab = 120
    model = RNNLM(vocab, cell=cell, embed_dim=32, hidden_size=32, num_layers=2, **kw)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(5, 30, (16,), generator=gen)]
    return model, PackedCollator(pad_id=0)(seqs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_bf16_training_step_is_finite_and_close_to_fp32(cell):
    """The step-by-step path scores the full softmax under autocast, so bf16 really acts here.

    Tolerance: bf16 keeps 8 significand bits (relative rounding 2^-9, about 0.2%) and
    the loss averages ~270 such log-probabilities: 1% on the loss, and a gradient
    cosine similarity above 0.99.
    """
    model, batch = _model_and_batch(cell)
    loss32, grads32 = _step(model, batch, choose("off", "cpu", None), stepwise=True)
    policy = choose("bf16", "cpu", None)
    policy.apply(model)
    loss16, grads16 = _step(model, batch, policy, stepwise=True)
    assert math.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads16)
    assert loss16 != loss32  # the output layer did run in bf16
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    flat32, flat16 = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads16])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.99
    # the fused CPU training path (_LinearCrossEntropy) computes in fp32 whatever the region
    assert _step(model, batch, policy)[0] == _step(model, batch, choose("off", "cpu", None))[0]


def test_cpu_bf16_adaptive_softmax_runs_in_fp32():
    """CPU autocast breaks torch's adaptive softmax (bf16 log-probs copied into an fp32
    output); the policy runs it, like the RNN, in fp32: the step is then exactly fp32's."""
    model, batch = _model_and_batch("lstm", adaptive_cutoffs=[20, 60])
    policy = choose("bf16", "cpu", None)
    h, targets = torch.randn(40, 32), torch.arange(40) * 3  # fp32 RNN outputs, targets in every cluster
    with pytest.raises(RuntimeError, match="same dtype"), policy.autocast():
        model.head(h, targets)  # what apply() prevents
    loss32, grads32 = _step(model, batch, choose("off", "cpu", None))
    policy.apply(model)
    loss16, grads16 = _step(model, batch, policy)
    assert loss16 == loss32 and all(torch.equal(a, b) for a, b in zip(grads16, grads32))
    with torch.no_grad(), policy.autocast():
        assert model.head.log_prob(torch.randn(3, 32)).dtype == FP32
