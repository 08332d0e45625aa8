"""Collators: turn the samples a batch sampler picked into packed (or padded) tensors.

This module imports only torch and numpy, so other projects can use it without the
ingestion stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence


@dataclass
class PackedBatch:
    """A batch of variable-length token sequences, packed for a recurrent layer.

    Layout (the contract the model relies on): sequences are sorted by length,
    longest first; ``inputs.data`` is time-major — all step-0 tokens of the active
    sequences in sorted order, then all step-1 tokens, ... — and ``batch_sizes[t]``
    is how many sequences are still running at step ``t``, exactly as
    ``pack_padded_sequence(..., enforce_sorted=False)`` would make it.

    Attributes:
        inputs: token ids, ``PackedSequence`` with ``sorted_indices`` and
            ``unsorted_indices`` set, so ``pad_packed_sequence`` returns the
            caller's order.
        targets: with ``shift=True`` the teacher-forcing targets (each sequence
            shifted left by one), packed with the same ``batch_sizes``, so
            ``targets.data[k]`` is the token that follows ``inputs.data[k]``.
            ``None`` with ``shift=False``.
        lengths: CPU int64 lengths of ``inputs`` in the caller's order.
        indices: positions in the caller's sample list, in packed (longest-first)
            order; equal to ``inputs.sorted_indices``.
    """

    inputs: PackedSequence
    targets: PackedSequence | None
    lengths: torch.Tensor
    indices: torch.Tensor
