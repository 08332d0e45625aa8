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

from lm import precision
from lm.config import load
from lm.model import RNNLM
from lm.precision import choose
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
    assert p.ambient == (rnn_dtype == FP16)  # an autocast region around the forward only for an fp16 RNN


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
    assert choose("bf16", "cpu", None, cpu_bf16=precision.cpu_has_bf16()) == precision.for_device("bf16", "cpu")


def test_bf16_on_a_cpu_without_bf16_arithmetic_is_fp32_with_a_note(monkeypatch):
    """Never an error: the run goes on in fp32, and the start-of-run line says why."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    policy = precision.for_device("bf16", "cpu")
    assert (policy.dtype, policy.rnn_dtype, policy.scaler, policy.tf32) == (None, torch.float32, False, False)
    assert "\n" not in policy.description  # one line at the start of the run
    assert policy.description.startswith("precision: fp32 throughout on cpu: train.amp=bf16 asked for, but this CPU "
                                         "has no bf16 arithmetic")
    model = nn.Sequential(nn.LSTM(4, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 20, [5]))
    policy.apply(model)
    assert [type(m) for m in model] == [nn.LSTM, nn.AdaptiveLogSoftmaxWithLoss]  # nothing swapped
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.for_device("bf16", "cpu").dtype == torch.bfloat16
    assert precision.for_device("off", "cpu").dtype is None


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


# ------------------------------------------------------- the output layer, not the RNN


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_apply_puts_the_output_layer_in_bf16_and_leaves_the_rnn_in_fp32(cell):
    torch.manual_seed(0)
    model = RNNLM(30, cell=cell, embed_dim=8, hidden_size=8, num_layers=2).eval()
    keys = list(model.state_dict())
    rnn_class = type(model.rnn)
    policy = choose("bf16", "cpu", None)
    assert policy.apply(model) is model and type(model.head) is precision.BF16Linear
    policy.apply(model)  # idempotent
    assert type(model.head) is precision.BF16Linear and isinstance(model.head, nn.Linear)
    assert type(model.rnn) is rnn_class and list(model.state_dict()) == keys
    seen = {}
    model.rnn.register_forward_hook(lambda m, i, o: seen.__setitem__("rnn", o[0]))
    with torch.no_grad(), policy.autocast():
        out = model(PackedCollator(pad_id=0)([[1, 5, 7, 2], [1, 9, 2]]))
    rnn_out = seen["rnn"]
    assert (rnn_out.data if hasattr(rnn_out, "data") else rnn_out).dtype == FP32
    assert out.logits.dtype == BF16


def test_no_ambient_autocast_so_the_rnn_is_fp32_however_it_is_called():
    """bf16 policies open no region around the forward: a direct kernel call (as weight drop
    makes, ``torch._VF``) stays fp32. CPU autocast would run a padded LSTM in bf16."""
    lstm, x = nn.LSTM(8, 8), torch.randn(5, 2, 8)  # (T, B, E)
    with torch.autocast("cpu", dtype=BF16):
        assert lstm(x)[0].dtype == BF16  # what an ambient region would do
    for policy in (choose("bf16", "cpu", None), choose("bf16", "cuda", 91300), choose("fp16", "cuda", None)):
        assert not policy.ambient
        with policy.autocast():
            assert lstm(x)[0].dtype == FP32
            h = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
            assert torch._VF.lstm(x, h, lstm._flat_weights, True, 1, 0.0, False, False, False)[0].dtype == FP32
    assert choose("fp16", "cuda", 90100).ambient  # the fp16 cuDNN RNN: autocast around the forward


def test_apply_keeps_tied_weights():
    model = RNNLM(30, cell="lstm", embed_dim=8, hidden_size=8, num_layers=1, tie_weights=True)
    choose("bf16", "cpu", None).apply(model)
    assert model.head.weight is model.embed.weight


def test_apply_without_autocast_changes_nothing():
    model = nn.Sequential(nn.LSTM(4, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 20, [5]), nn.Linear(4, 4))
    choose("off", "cpu", None).apply(model)
    assert [type(m) for m in model] == [nn.LSTM, nn.AdaptiveLogSoftmaxWithLoss, nn.Linear]


@pytest.fixture
def tf32_off():
    """The global TF32 flags off for the test, put back after. Not monkeypatch: from pytest
    9.2 its undo deletes an attribute it did not find in the object's ``__dict__``, and
    torch's ``cuBLASModule`` serves ``allow_tf32`` from ``__getattr__`` (and cannot delete it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("amp, device, adaptive, inner", [
    ("bf16", "cuda", precision.BF16AdaptiveLogSoftmaxWithLoss, precision.BF16Linear),
    ("fp16", "cuda", precision.FP16AdaptiveLogSoftmaxWithLoss, precision.FP16Linear),
    ("bf16", "cpu", precision.FP32AdaptiveLogSoftmaxWithLoss, precision.BF16LinearFP32Out),  # CPU: fp32 softmax
])
def test_apply_swaps_the_right_modules(amp, device, adaptive, inner, tf32_off):
    """(On CPU tensors: which classes each policy installs, and its TF32 flags.)"""
    model = nn.Sequential(nn.LSTM(4, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 20, [5]))
    choose(amp, device, 90100).apply(model)
    assert [type(m) for m in model] == [nn.LSTM, adaptive]
    assert {type(m) for m in model[1].modules() if isinstance(m, nn.Linear)} == {inner}
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (device == "cuda")


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


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_bf16_fused_training_step_runs_its_gemms_in_bf16(cell):
    """Teacher forcing on a CPU takes the fused output layer + loss (_LinearCrossEntropy);
    with a bf16 policy its GEMMs take bf16 operands: the same step as fp32 within bf16's
    rounding, not bit for bit, and not the same as leaving the policy off."""
    model, batch = _model_and_batch(cell)
    loss32, grads32 = _step(model, batch, choose("off", "cpu", None))
    policy = choose("bf16", "cpu", None)
    policy.apply(model)
    loss16, grads16 = _step(model, batch, policy)
    assert math.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads16)
    assert loss16 != loss32
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert len(grads16) == len(grads32)
    for g32, g16 in zip(grads32, grads16):
        assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99


def test_cpu_bf16_adaptive_softmax_runs_its_gemms_in_bf16_and_its_softmax_in_fp32():
    """CPU autocast breaks torch's adaptive softmax (bf16 log-probs copied into an fp32
    output); on a CPU the policy runs its linear layers in bf16 and returns fp32 from them,
    so log-softmax, gathers and the loss are fp32: the step is close to fp32's, not equal."""
    model, batch = _model_and_batch("lstm", adaptive_cutoffs=[20, 60])
    policy = choose("bf16", "cpu", None)
    h, targets = torch.randn(40, 32), torch.arange(40) * 3  # fp32 RNN outputs, targets in every cluster
    with pytest.raises(RuntimeError, match="same dtype"), torch.autocast("cpu", dtype=BF16):
        model.head(h, targets)  # torch's adaptive softmax inside CPU autocast
    loss32, grads32 = _step(model, batch, choose("off", "cpu", None))
    with torch.no_grad():
        ref = model.head(h, targets).output
    policy.apply(model)
    loss16, grads16 = _step(model, batch, policy)
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)  # bf16 operands: near, not equal
    for g32, g16 in zip(grads32, grads16):
        assert g16.dtype == FP32 and torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99
    with torch.no_grad():
        assert model.head.head.bias is None  # torch's default head_bias=False
        bf16_gemm = (h.to(BF16) @ model.head.head.weight.to(BF16).T).float()  # (40, shortlist + clusters)
        assert torch.equal(model.head.head(h), bf16_gemm)
        out = model.head(h, targets).output
        assert out.dtype == FP32 and not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):  # even inside a region
        assert model.head(h, targets).output.dtype == model.head.log_prob(h).dtype == FP32
