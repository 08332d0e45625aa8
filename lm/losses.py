"""The full-softmax output layer fused with its cross-entropy loss, for CPU training.

:class:`lm.model.RNNLM` calls :func:`linear_cross_entropy_sum` when the caller wants
only the loss (``need_logits=False``) and gradients are being taken on a CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_TINY = torch.finfo(torch.float32).tiny  # a probability that rounded to 0 scores as ~87.3 nats, not inf

# One reusable block per (device, dtype) for a chunk of logits: on a CPU a fresh (2,048, V)
# tensor per chunk is a fresh mmap (272 MB at V = 33,280) that the kernel faults in and
# zeroes every time, and blocks of varying size fragment the heap when glibc is told to keep
# them (lm.runtime.tune_allocator). A flat block serves every chunk shape up to its size.
_BLOCKS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def block(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(rows, cols)`` scratch tensor carved from a block kept across calls.

    Its contents are garbage. The block is shared: a caller must be done with the tensor
    before anything asks for another of the same device and dtype (the chunk loops here are).
    It grows to the largest request and is never shrunk.
    """
    key = (torch.device(device), dtype)
    buf = _BLOCKS.get(key)
    if buf is None or buf.numel() < rows * cols:
        _BLOCKS.pop(key, None)  # the smaller block goes first, so the two never coexist
        buf = _BLOCKS[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(h @ weight.T + bias, targets))`` computed a chunk of tokens at a time.

    The loss is the end of the graph, so its gradients are known in the forward pass:
    each chunk's logits are turned in place into ``softmax - onehot`` and multiplied out
    at once, never holding ``(N, V)`` logits and skipping the separate log-softmax
    backward pass. On a CPU that is ~15% of a full-softmax training step saved. The
    saved gradients are constants, so a second derivative is refused, not silently wrong.

    ``dtype=torch.bfloat16`` (``train.amp=bf16``) runs the three GEMMs of a chunk (logits,
    gradient of ``h``, gradient of ``weight`` and ``bias``) on bf16 operands, as autocast
    does for a linear layer: the logits and ``softmax - onehot`` are rounded to bf16
    (the softmax itself is computed in fp32 inside the kernel, the target's ``p - 1`` in
    fp32 before rounding), each chunk's weight gradient is summed into fp32, and the loss
    is ``-log p`` of the target read from the bf16 softmax (relative error <= 2^-9 per
    probability, so <= 0.002 nats per token). On CPUs with AVX-512 BF16 or AMX the GEMMs
    run at several times their fp32 rate (``bench/train_speed.py``).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype | None) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):  # the gradients are summed here, in fp32
            if dtype in (None, torch.float32):
                grads = _fp32_chunks(h, weight, bias, targets, chunk)
            else:
                grads = _low_precision_chunks(h, weight, bias, targets, chunk, dtype)
        nll, *saved = grads
        ctx.save_for_backward(*saved)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, grad_b * grad_out, None, None, None


def _fp32_chunks(h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """(summed NLL, grad h, grad weight, grad bias), everything in fp32."""
    grad_h, grad_w, grad_b = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
    nll = h.new_zeros(())
    for s in range(0, h.size(0), chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]  # (c, H), (c,)
        logp = torch.addmm(bias, hc, weight.t(), out=block(tc.numel(), weight.size(0), h.dtype, h.device))  # (c, V)
        torch.ops.aten._log_softmax.out(logp, 1, False, out=logp)  # in place, row by row
        nll -= logp.gather(1, tc[:, None]).sum()
        g = logp.exp_()  # (c, V) softmax, in place
        g[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0  # d nll / d logits
        torch.mm(g, weight, out=grad_h[s : s + chunk])
        grad_w.addmm_(g.t(), hc)
        grad_b += g.sum(0)
    return nll, grad_h, grad_w, grad_b


def _low_precision_chunks(h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int,
                          dtype: torch.dtype) -> tuple[Tensor, ...]:
    """As :func:`_fp32_chunks` with the GEMMs on ``dtype`` operands (see the class docstring)."""
    n, H = h.shape
    wq, bq = weight.to(dtype), bias.to(dtype)  # (V, H), (V,): one cast per step
    grad_h = torch.empty_like(h)
    grad_wb = weight.new_zeros(weight.size(0), H + 1)  # [grad weight | grad bias], fp32
    hq = h.new_empty(min(chunk, n), H + 1, dtype=dtype)
    hq[:, H] = 1  # a column of ones: the bias gradient comes out of the weight-gradient GEMM
    nll = h.new_zeros(())
    for s in range(0, n, chunk):
        tc = targets[s : s + chunk]
        c = tc.numel()
        ha = hq[:c]
        ha[:, :H].copy_(h[s : s + c])
        p = torch.addmm(bq, ha[:, :H], wq.t(), out=block(c, wq.size(0), dtype, h.device))  # (c, V) logits
        torch.ops.aten._softmax.out(p, 1, False, out=p)  # in place; fp32 inside the kernel
        rows = torch.arange(c, device=tc.device)
        pt = p[rows, tc].float()
        nll -= pt.clamp_min(_TINY).log().sum()
        p[rows, tc] = (pt - 1.0).to(dtype)  # d nll / d logits
        grad_h[s : s + c] = torch.mm(p, wq)
        grad_wb += torch.mm(p.t(), ha)
    return nll, grad_h, grad_wb[:, :H].contiguous(), grad_wb[:, H].contiguous()


def linear_cross_entropy_sum(h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int = 2048,
                             dtype: torch.dtype | None = None) -> Tensor:
    """Summed NLL of ``targets`` under ``softmax(h @ weight.T + bias)``, without ``(N, V)`` logits.

    Args:
        h: ``(N, H)`` fp32 inputs of the output layer.
        weight: ``(V, H)`` output matrix.
        bias: ``(V,)`` output bias.
        targets: ``(N,)`` target ids.
        chunk: tokens scored at a time.
        dtype: the GEMMs' operand dtype: ``None`` (fp32 throughout) or ``torch.bfloat16``.

    Returns:
        The scalar summed NLL (fp32); differentiable once in ``h``, ``weight`` and ``bias``.
    """
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk, dtype)


@torch.no_grad()
def chunked_nll(h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int = 2048,
                dtype: torch.dtype | None = None) -> Tensor:
    """Per-token NLL ``(N,)`` of ``targets`` under ``softmax(h @ weight.T + bias)``, for evaluation.

    A chunk of tokens at a time in reused blocks (:func:`block`): the logits, then the
    log-softmax in place over them, so scoring a split allocates nothing per chunk. With
    ``dtype=torch.bfloat16`` the logits are computed from bf16 operands and rounded to bf16,
    the log-softmax in fp32 (what autocast and ``cross_entropy(logits.float())`` give).
    """
    n, V = h.size(0), weight.size(0)
    low = dtype not in (None, torch.float32)
    wq, bq = (weight.to(dtype), bias.to(dtype)) if low else (weight.float(), bias.float())  # once, not per chunk
    out = h.new_empty(n, dtype=torch.float32)
    for s in range(0, n, chunk):
        hc, tc = h[s : s + chunk], targets[s : s + chunk]
        logp = block(tc.numel(), V, torch.float32, h.device)
        if low:
            logp.copy_(torch.addmm(bq, hc.to(dtype), wq.t(), out=block(tc.numel(), V, dtype, h.device)))
        else:
            torch.addmm(bq, hc.float(), wq.t(), out=logp)
        torch.ops.aten._log_softmax.out(logp, 1, False, out=logp)
        torch.neg(logp.gather(1, tc[:, None]).squeeze(1), out=out[s : s + chunk])
    return out
