"""The AWD-LSTM regularisers (Merity et al. 2017) as plain functions on packed tensors.

Packed data is time-major: the tokens of step 0 (one per sequence, longest sequence
first), then those of step 1, ...; sequence ``j`` (in sorted order) is present at step
``t`` iff ``j < batch_sizes[t]``. Every random draw uses torch's global RNG on the
tensor's device, which the trainer checkpoints, so a resumed run draws the same masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def word_dropout_scale(vocab_size: int, p: float, like: Tensor) -> Tensor:
    """Embedding dropout on whole words: a ``(V,)`` multiplier, 0 for a dropped word
    (everywhere in the batch) and ``1 / (1 - p)`` for a kept one.

    Multiplying the looked-up rows by ``scale[ids]`` equals looking them up in the
    row-masked matrix ``scale[:, None] * weight`` (AWD-LSTM's ``embedded_dropout``)
    without forming that ``(V, E)`` copy; an output layer tied to the embedding keeps
    the undropped matrix.
    """
    return like.new_empty(vocab_size).bernoulli_(1.0 - p).div_(1.0 - p)  # (V,)


def locked_mask(num_seqs: int, dim: int, p: float, like: Tensor) -> Tensor:
    """Variational (locked) dropout: one ``(B, D)`` mask row per sequence, for all its time
    steps; entries 0 or ``1 / (1 - p)``."""
    return like.new_empty(num_seqs, dim).bernoulli_(1.0 - p).div_(1.0 - p)  # (B, D)


def drop_connect(weight: Tensor, p: float) -> Tensor:
    """Weight drop (DropConnect): each entry of ``weight`` zeroed with probability ``p``,
    the rest scaled by ``1 / (1 - p)``; gradients reach ``weight`` through the mask."""
    return F.dropout(weight, p, training=True)


def previous_step_index(batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Packed indices of every token after its sequence's first, and of its predecessor.

    Args:
        batch_sizes: ``(T,)`` the packed batch's sizes per time step.

    Returns:
        ``(cur, prev)``, each ``(N - B,)``: ``prev[i]`` is the same sequence's token one
        step before ``cur[i]`` (a sorted row keeps its index within every step).
    """
    n, first = int(batch_sizes.sum()), int(batch_sizes[0])
    cur = torch.arange(first, n)  # (N - B,) every token of steps >= 1
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes)[first:]  # (N - B,)
    return cur, cur - batch_sizes[step - 1]  # step t's offset minus step t-1's is bs_{t-1}


def activation_penalty(
    dropped: Tensor, raw: Tensor, batch_sizes: Tensor, ar: float, tar: float
) -> Tensor:
    """AR + TAR: ``ar * mean(dropped ** 2) + tar * mean((h_t - h_{t-1}) ** 2)``.

    AR penalises the top layer's (output-dropped) activations, TAR the change of its
    undropped activations between consecutive real tokens of the same sequence; each
    mean is over all features of the terms it has (``N * H`` and ``(N - B) * H``), as
    AWD-LSTM's ``.pow(2).mean()`` over its unpadded stream windows. The first token of
    a window has no predecessor in it, even when the state was carried in.

    Args:
        dropped: ``(N, H)`` packed top-layer outputs after output dropout.
        raw: ``(N, H)`` the same outputs before output dropout.
        batch_sizes: ``(T,)`` CPU packed batch sizes.
        ar: AR coefficient (alpha); 0 skips it.
        tar: TAR coefficient (beta); 0 skips it.

    Returns:
        The scalar penalty (0 where both are off or no token has a predecessor).
    """
    penalty = dropped.new_zeros(())
    if ar:
        penalty = penalty + ar * dropped.float().pow(2).mean()
    if tar and raw.size(0) > int(batch_sizes[0]):
        cur, prev = previous_step_index(batch_sizes)
        cur, prev = cur.to(raw.device), prev.to(raw.device)
        penalty = penalty + tar * (raw[cur].float() - raw[prev].float()).pow(2).mean()
    return penalty
