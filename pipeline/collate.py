"""Collators: turn the samples a batch sampler picked into packed (or padded) tensors.

This module imports only torch and numpy, so other projects can use it without the
ingestion stack.

Teacher-forcing targets are shifted here, and only here (``shift=True``): a sample
``[x0, x1, ..., xn]`` becomes inputs ``[x0, ..., x(n-1)]`` and targets ``[x1, ..., xn]``.
Nothing downstream (model, loss, trainer) shifts again.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, Union

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

__all__ = ["PackedBatch", "PackedCollator", "PadCollator", "PaddedBatch"]

# One sample: token ids as a list, a 1-D numpy array (the prepared dataset returns uint16
# or int32 views), a 1-D CPU tensor, or a dataset row holding one of those under ``key``.
Sample = Union[Sequence[int], np.ndarray, torch.Tensor, Mapping[str, Any]]

_MAX_RUNS = 4  # distinct lengths up to which PackedCollator packs by block copies


def _accelerator_available() -> bool:
    # tensor.pin_memory() raises without an accelerator; torch.accelerator is torch >= 2.6.
    acc = getattr(torch, "accelerator", None)
    return acc.is_available() if acc is not None else torch.cuda.is_available()


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
        pad_id: the id :meth:`padded` fills with (keyword-only; set by the collator).
    """

    inputs: PackedSequence
    targets: PackedSequence | None
    lengths: torch.Tensor
    indices: torch.Tensor
    pad_id: int = field(default=0, kw_only=True)

    @property
    def num_tokens(self) -> int:
        """Input tokens in the batch; with ``shift=True`` also the number of predicted targets."""
        return self.inputs.data.shape[0]  # a shape, so no device sync

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inputs as a padded batch-first tensor, in the caller's order.

        Returns:
            ``(ids, lengths, mask)``: ids ``(B, T)`` filled with ``pad_id`` past each
            length, on the inputs' device; lengths ``(B,)`` CPU int64; mask ``(B, T)``
            bool, True on real tokens.
        """
        ids, lengths = pad_packed_sequence(self.inputs, batch_first=True, padding_value=self.pad_id)  # (B, T)
        mask = torch.arange(ids.shape[1], device=ids.device) < lengths.to(ids.device)[:, None]  # (B, T)
        return ids, lengths, mask

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PackedBatch:
        """Move the token ids to ``device``. ``lengths`` and ``indices`` stay on the CPU,
        where ``pack_padded_sequence`` and host-side bookkeeping want them."""
        return PackedBatch(
            self.inputs.to(device, non_blocking=non_blocking),
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
            self.lengths,
            self.indices,
            pad_id=self.pad_id,
        )

    def pin_memory(self) -> PackedBatch:
        """Page-locked copy, called by ``DataLoader(pin_memory=True)``.

        Without an accelerator there is nothing to pin for, and the batch comes back as is.
        """
        if not _accelerator_available():
            return self
        return PackedBatch(
            self.inputs.pin_memory(),
            None if self.targets is None else self.targets.pin_memory(),
            self.lengths.pin_memory(),
            self.indices.pin_memory(),
            pad_id=self.pad_id,
        )


@dataclass
class PaddedBatch:
    """A batch of token sequences padded to a common length, batch-first, caller's order.

    Attributes:
        inputs: ``(B, T)`` int64 token ids, ``pad_id`` past each length.
        targets: ``(B, T)`` int64 teacher-forcing targets with ``shift=True``,
            ``target_pad_id`` past each length (``-100``, ``cross_entropy``'s default
            ``ignore_index``, unless set otherwise); ``None`` with ``shift=False``.
        mask: ``(B, T)`` bool, True on real tokens.
        lengths: ``(B,)`` CPU int64 lengths of ``inputs``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None
    mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real input tokens; with ``shift=True`` also the number of predicted targets."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PaddedBatch:
        """Move ids, targets and mask to ``device``; ``lengths`` stays on the CPU."""
        return PaddedBatch(
            self.inputs.to(device, non_blocking=non_blocking),
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            self.lengths,
        )

    def pin_memory(self) -> PaddedBatch:
        """Page-locked copy (as :meth:`PackedBatch.pin_memory`; a no-op without an accelerator)."""
        if not _accelerator_available():
            return self
        return PaddedBatch(
            self.inputs.pin_memory(),
            None if self.targets is None else self.targets.pin_memory(),
            self.mask.pin_memory(),
            self.lengths.pin_memory(),
        )


# ---------------------------------------------------------------------- helpers


def _token_lists(samples: Sequence[Sample], key: str) -> Sequence[Any]:
    if not samples:
        raise ValueError("empty batch: the sampler gave no samples")
    if isinstance(samples[0], Mapping):
        return [s[key] for s in samples]
    return samples


def _lengths(seqs: Sequence[Any], shift: bool, who: str) -> tuple[list[int], int, int]:
    """Sample lengths, shortest, longest; raises if a sample is too short to pack.

    Plain Python: over a batch's worth of ints this is cheaper than numpy calls.
    """
    lens = list(map(len, seqs))
    shortest, longest = min(lens), max(lens)
    if shortest < 1 + shift:
        bad = [i for i, n in enumerate(lens) if n < 1 + shift]
        need = "at least 2 tokens (an input and its target)" if shift else "at least 1 token"
        raise ValueError(
            f"{who}(shift={shift}) needs {need} per sample; batch positions {bad[:10]} have "
            f"{sorted({lens[i] for i in bad})} — filter such samples out when preparing the data"
        )
    return lens, shortest, longest


def _concat(seqs: Sequence[Any], total: int) -> np.ndarray:
    """All tokens of ``seqs`` back to back, as one flat integer numpy array (dtype kept)."""
    first = seqs[0]
    if isinstance(first, np.ndarray):
        flat = np.concatenate(seqs)
    elif isinstance(first, torch.Tensor):
        flat = torch.cat(seqs).numpy()  # 5x cheaper than a .numpy() per tensor
    elif isinstance(first, (list, tuple)):
        try:
            flat = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=total)
        except (TypeError, ValueError):  # mixed sample types, or not ints: let numpy sort it out
            flat = np.concatenate([np.asarray(s) for s in seqs])
    else:
        flat = np.concatenate([np.asarray(s) for s in seqs])
    if flat.ndim != 1 or flat.size != total:
        raise ValueError("each sample must be a 1-D sequence of token ids")
    if flat.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {flat.dtype}")
    return flat


def _pack_runs(
    flat: np.ndarray, runs: list[tuple[int, int]], shift: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pack a batch made of a few runs of equal length, with strided block copies.

    The sequences of one run form a (count, length) grid of ``flat``; steps where runs
    ``0..b`` are active form a block of the packed data, filled column-wise from those
    grids, transposed. That is ``k(k+1)/2`` copies for ``k`` runs and no index arrays.

    Args:
        flat: (sum L,) the sequences back to back, longest first.
        runs: ``(length, count)`` per run, longest first.
        shift: also make the targets (each step's next token).

    Returns:
        ``(inputs, targets, batch_sizes)``: (N,) int64, (N,) int64 or ``None``, (T,) int64.
    """
    T = runs[0][0] - shift
    if len(runs) == 1:  # a plain transpose
        grid = flat.reshape(runs[0][1], runs[0][0])  # (B, L)
        inputs = np.ascontiguousarray(grid[:, :T].T, dtype=np.int64).reshape(-1)  # (T*B,)
        targets = np.ascontiguousarray(grid[:, 1:].T, dtype=np.int64).reshape(-1) if shift else None
        return inputs, targets, np.full(T, runs[0][1], dtype=np.int64)
    grids, start, cols = [], 0, 0
    for length, count in runs:  # (grid (count, length), first column, last column + 1)
        grids.append((flat[start : start + length * count].reshape(count, length), cols, cols + count))
        start, cols = start + length * count, cols + count
    inputs = np.empty(start - shift * cols, dtype=np.int64)  # (N,)
    targets = np.empty_like(inputs) if shift else None
    batch_sizes = np.empty(T, dtype=np.int64)  # (T,)
    pos, t0 = 0, 0
    for b in range(len(runs) - 1, -1, -1):  # earliest steps first; runs 0..b are active there
        t1, width = runs[b][0] - shift, grids[b][2]
        n = (t1 - t0) * width
        batch_sizes[t0:t1] = width
        for out, lag in ((inputs, 0), (targets, 1)) if shift else ((inputs, 0),):
            block = out[pos : pos + n].reshape(t1 - t0, width)  # (steps, active sequences)
            for grid, j0, j1 in grids[: b + 1]:
                block[:, j0:j1] = grid[:, t0 + lag : t1 + lag].T
        pos, t0 = pos + n, t1
    return inputs, targets, batch_sizes


def _pack_gather(
    flat: np.ndarray, lengths: np.ndarray, shift: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pack any batch with one index gather: step ``t`` of the ``j``-th sequence is read
    from ``starts[j] + t`` and lands at ``sum(batch_sizes[:t]) + j``.

    Args:
        flat: (sum L,) the sequences back to back, longest first.
        lengths: (B,) their lengths, descending.
        shift: also make the targets (each step's next token).

    Returns:
        as :func:`_pack_runs`.
    """
    steps = lengths - shift  # (B,)
    t = np.arange(steps[0])[:, None]  # (T, 1)
    active = t < steps  # (T, B)
    src = (np.cumsum(lengths) - lengths + t)[active]  # (N,) flat position of every packed token
    flat = flat.astype(np.int64)
    return flat[src], flat[src + 1] if shift else None, active.sum(1)


# -------------------------------------------------------------------- collators


class PackedCollator:
    """Collate token sequences into a :class:`PackedBatch`, for ``DataLoader(collate_fn=...)``.

    Samples are concatenated once, longest first, into a flat array, which is packed
    without a padded tensor in between: a batch of equal lengths (most batches from
    :class:`~pipeline.sampling.BucketBatchSampler`) is a transpose of its ``(B, L)``
    grid; a few distinct lengths take one strided block copy per run and time block;
    anything else one index gather (step ``t`` of the ``j``-th longest sequence lands at
    ``sum(batch_sizes[:t]) + j``). Ties in length keep the caller's order.

    Args:
        pad_id: id :meth:`PackedBatch.padded` fills with (packing itself needs none).
        shift: make teacher-forcing pairs: inputs ``seq[:-1]``, targets ``seq[1:]``.
            ``False`` packs the sequences as they are (encoders), ``targets=None``.
        key: field holding the token ids when samples are dataset rows (mappings).

    Raises (on call):
        ValueError: an empty batch, a sample with no tokens, or with ``shift=True`` a
            sample with a single token (no target) — filter those when preparing data.
    """

    def __init__(self, pad_id: int = 0, *, shift: bool = True, key: str = "input_ids") -> None:
        self.pad_id = pad_id
        self.shift = shift
        self.key = key

    def __repr__(self) -> str:
        return f"PackedCollator(pad_id={self.pad_id}, shift={self.shift}, key={self.key!r})"

    def __call__(self, samples: Sequence[Sample]) -> PackedBatch:
        """Pack ``samples`` (a list of token sequences, or of rows with ``key``).

        Returns:
            a :class:`PackedBatch` whose ``indices`` are positions in ``samples``.
        """
        seqs = _token_lists(samples, self.key)
        lens, shortest, longest = _lengths(seqs, self.shift, "PackedCollator")
        B = len(lens)
        if shortest == longest:  # common after bucketing: already in order, one run
            order = unsorted = np.arange(B)
            flat = _concat(seqs, B * longest)  # (sum L,)
            runs = [(longest, B)]
            lengths = np.full(B, longest - self.shift, dtype=np.int64)  # (B,)
        else:
            full = np.array(lens, dtype=np.int64)  # (B,)
            order = np.argsort(-full, kind="stable")  # (B,) longest first; ties keep the caller's order
            unsorted = np.argsort(order)
            flat = _concat(itemgetter(*order)(seqs), sum(lens))  # (sum L,) longest first
            runs = sorted(Counter(lens).items(), reverse=True)  # (length, count), longest first
            lengths = full - self.shift  # (B,)

        # THE one place in the toolkit where targets are shifted: inputs seq[:-1], targets seq[1:].
        # Bucketed batches hold a few distinct lengths: block copies beat an index gather
        # there (measured: 2 runs 1.2x, 3-4 runs 1.5x faster) and lose beyond ~5 runs.
        if len(runs) <= _MAX_RUNS:
            inputs, targets, batch_sizes = _pack_runs(flat, runs, self.shift)
        else:
            inputs, targets, batch_sizes = _pack_gather(flat, full[order], self.shift)

        sorted_t, unsorted_t, bs_t = torch.from_numpy(order), torch.from_numpy(unsorted), torch.from_numpy(batch_sizes)
        return PackedBatch(
            PackedSequence(torch.from_numpy(inputs), bs_t, sorted_t, unsorted_t),
            None if targets is None else PackedSequence(torch.from_numpy(targets), bs_t, sorted_t, unsorted_t),
            torch.from_numpy(lengths),
            sorted_t,
            pad_id=self.pad_id,
        )


class PadCollator:
    """Collate token sequences into a padded, batch-first :class:`PaddedBatch`.

    For consumers that cannot take a ``PackedSequence`` (ONNX export, attention
    models). Samples keep the caller's order.

    Args:
        pad_id: id filling ``inputs`` past each length.
        shift: as :class:`PackedCollator`: inputs ``seq[:-1]``, targets ``seq[1:]``.
        key: field holding the token ids when samples are dataset rows (mappings).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        target_pad_id: id filling ``targets`` past each length; the default ``-100``
            is ``cross_entropy``'s ``ignore_index``, so padded targets need no mask.

    Raises (on call):
        ValueError: as :class:`PackedCollator`.
    """

    def __init__(
        self,
        pad_id: int = 0,
        *,
        shift: bool = True,
        key: str = "input_ids",
        pad_to_multiple_of: int | None = None,
        target_pad_id: int = -100,
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.shift = shift
        self.key = key
        self.pad_to_multiple_of = pad_to_multiple_of
        self.target_pad_id = target_pad_id

    def __repr__(self) -> str:
        return (
            f"PadCollator(pad_id={self.pad_id}, shift={self.shift}, key={self.key!r}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of}, target_pad_id={self.target_pad_id})"
        )

    def __call__(self, samples: Sequence[Sample]) -> PaddedBatch:
        """Pad ``samples`` (a list of token sequences, or of rows with ``key``)."""
        seqs = _token_lists(samples, self.key)
        lens, _, longest = _lengths(seqs, self.shift, "PadCollator")
        flat = _concat(seqs, sum(lens)).astype(np.int64, copy=False)
        full = np.array(lens, dtype=np.int64)  # (B,)
        steps = full - self.shift  # (B,) the same shift as PackedCollator: this module is the only place it happens
        T = longest - self.shift
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        mask = np.arange(T) < steps[:, None]  # (B, T)
        src = ((np.cumsum(full) - full)[:, None] + np.arange(T))[mask]  # (N,) flat position of each real token
        inputs = np.full((len(seqs), T), self.pad_id, dtype=np.int64)  # (B, T)
        inputs[mask] = flat[src]
        targets = None
        if self.shift:
            targets = np.full((len(seqs), T), self.target_pad_id, dtype=np.int64)  # (B, T)
            targets[mask] = flat[src + 1]
        return PaddedBatch(
            torch.from_numpy(inputs),
            None if targets is None else torch.from_numpy(targets),
            torch.from_numpy(mask),
            torch.from_numpy(steps),
        )
