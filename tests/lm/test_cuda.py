"""CUDA: what a CPU cannot check. Skipped without a GPU (``@pytest.mark.cuda``); run by
``bench/gpu.sh`` on a GPU machine.

Tolerances: the cuDNN-vs-CPU comparisons run in fp32 with TF32 off; cuDNN and oneDNN sum
in other orders, so per-token NLL agrees to ~1e-6 relative — asserted at rtol 1e-4,
atol 1e-5 (a wrong mask, order or state is off by far more).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lm import precision
from lm.decode import generate
from lm.model import RNNLM
from pipeline.collate import PackedCollator

pytestmark = pytest.mark.cuda

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 50


@pytest.fixture(autouse=True)
def _exact_fp32():
    """No TF32 while comparing with the CPU (restored afterwards)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _model(cell: str, **kw) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(VOCAB, cell=cell, embed_dim=24, hidden_size=32, num_layers=2, **kw)


def _batch(n: int = 9, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 25, (n,), generator=gen)
    return PackedCollator(pad_id=0)([torch.randint(1, VOCAB, (int(k),), generator=gen).tolist() for k in lens])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_forward_on_cudnn_equals_cpu(cell):
    model = _model(cell).eval()
    batch = _batch()
    with torch.no_grad():
        cpu = model(batch)
        gpu = model.cuda()(batch.to("cuda"))
    torch.testing.assert_close(gpu.nll_sum.cpu(), cpu.nll_sum, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(gpu.state, cpu.state):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_greedy_decoding_on_cuda_equals_cpu(cell):
    model = _model(cell)
    with torch.no_grad():
        model.head.weight.mul_(30)  # wide logit gaps: an argmax tie cannot flip on summation order
    prompts = [[1, 5, 7], [1], [1, 9, 9, 9, 4]]
    cpu = generate(model, prompts, max_new_tokens=12, eos_id=2)
    gpu = generate(model.cuda(), prompts, max_new_tokens=12, eos_id=2)
    assert gpu == cpu and any(cpu)


def test_padded_cpu_fast_path_is_not_taken_on_cuda():
    """need_state=False on a CPU batch of unequal lengths runs padded and returns no state;
    on CUDA the packed cuDNN call is the fast one, and it returns the state."""
    model = _model("lstm").eval()
    batch = _batch()
    assert len(set(batch.lengths.tolist())) > 1
    with torch.no_grad():
        assert model(batch, need_state=False).state is None  # CPU: the padded path
        out = model.cuda()(batch.to("cuda"), need_state=False)
    assert out.state is not None


def test_autocast_policy_as_chosen():
    auto = precision.for_device("auto", torch.device("cuda"))
    assert auto.dtype == torch.bfloat16 and auto.rnn_dtype == torch.float32 and not auto.scaler
    model = auto.apply(_model("lstm").cuda())
    seen = {}
    model.rnn.register_forward_hook(lambda m, i, o: seen.__setitem__("rnn", o[0].data.dtype))
    with auto.autocast():
        out = model(_batch().to("cuda"))
    assert seen["rnn"] == torch.float32 and out.logits.dtype == torch.bfloat16 and math.isfinite(out.nll_sum.item())

    fp16 = precision.for_device("fp16", torch.device("cuda"))
    assert fp16.scaler and fp16.grad_scaler().is_enabled()
    plain = _model("lstm").cuda()
    plain.rnn.register_forward_hook(lambda m, i, o: seen.__setitem__("rnn", o[0].data.dtype))
    with fp16.autocast():
        plain(_batch().to("cuda"))
    want = torch.float16 if torch.backends.cudnn.is_available() else torch.float32
    assert seen["rnn"] == want  # autocast's cuDNN RNN wrapper: fp16 whatever was asked


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_adaptive_softmax_training_step_under_each_policy(amp):
    """torch's adaptive softmax copies fp32 log-probs into an output of its input's dtype:
    an fp16 RNN output would fail there; the policy feeds it fp32."""
    policy = precision.for_device(amp, torch.device("cuda"))
    model = policy.apply(_model("lstm", adaptive_cutoffs=[10, 30]).cuda())
    scaler = policy.grad_scaler()
    with policy.autocast():
        out = model(_batch().to("cuda"), need_state=False, need_logits=False)
    scaler.scale(out.loss).backward()
    assert math.isfinite(out.loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_one_ddp_step_with_nccl_equals_the_plain_step(tmp_path):
    """World size 1: DDP over NCCL (bucketed all-reduce of the packed model's gradients,
    find_unused_parameters for the adaptive softmax) gives the plain step's gradients."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    plain = _model("lstm", adaptive_cutoffs=[10, 30]).cuda()
    twin = _model("lstm", adaptive_cutoffs=[10, 30]).cuda()
    batch = _batch().to("cuda")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        ddp = DistributedDataParallel(twin, device_ids=[0], find_unused_parameters=True)
        for m in (plain, ddp):
            m(batch, need_state=False, need_logits=False).loss.backward()
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain.parameters(), twin.parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any()
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_trainer_runs_on_cuda(toy_recipe, lm_env):
    """The trainer end to end on the GPU with the default precision (``auto``)."""
    path = toy_recipe("cuda", train={"device": "cuda", "amp": "auto", "epochs": 1, "eval_every": None})
    proc = subprocess.run([sys.executable, "-m", "lm.train", str(path)], cwd=REPO_ROOT, env=lm_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda" in proc.stderr
    result = json.loads((path.parent / "cuda" / "result.json").read_text())
    assert result["skipped_steps"] == 0 and math.isfinite(result["best_val_ppl"]) and math.isfinite(result["test_ppl"])
    assert "precision: output layer in bf16" in proc.stderr  # the policy's one line (lm/precision.py), logged once
