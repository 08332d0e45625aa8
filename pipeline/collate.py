"""Collators: turn the samples a batch sampler picked into packed (or padded) tensors.

This module imports only torch and numpy, so other projects can use it without the
ingestion stack.

Teacher-forcing targets are shifted here, and only here (``shift=True``): a sample
``[x0, x1, ..., xn]`` becomes inputs ``[x0, ..., x(n-1)]`` and targets ``[x1, ..., xn]``.
Nothing downstream (model, loss, trainer) shifts again.

Every other field of a dict row (a label, an id, per-token tags) comes through in the
batch's ``fields``, in the caller's order: see :class:`PackedCollator` for how each kind
of value is collated.
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
# A collated field: a tensor (numbers), a PackedSequence (a packed token-level field) or a list.
Field = Union[torch.Tensor, PackedSequence, list]

_MAX_RUNS = 4  # distinct lengths up to which PackedCollator packs by block copies
# torch's default dtype as numpy's, for Python floats in token-level fields (bfloat16 has none: float32)
_NUMPY_FLOAT = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


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
        fields: the rows' other fields by name (keyword-only; empty for rows that are not
            mappings). A per-row field is a tensor or a list in the caller's order — the
            order of ``lengths``, of ``pad_packed_sequence(inputs)`` and of an RNN's
            ``h_n`` — so ``fields[name][i]`` belongs to sample ``i``. A token-level field
            (the collator's ``pack_fields``) is a ``PackedSequence`` sharing the inputs'
            ``batch_sizes``, ``sorted_indices`` and ``unsorted_indices``, so its
            ``data[k]`` belongs to the token ``inputs.data[k]``.
    """

    inputs: PackedSequence
    targets: PackedSequence | None
    lengths: torch.Tensor
    indices: torch.Tensor
    pad_id: int = field(default=0, kw_only=True)
    fields: dict[str, Field] = field(default_factory=dict, kw_only=True)

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
        """Move the token ids and the tensor fields to ``device``. ``lengths`` and
        ``indices`` stay on the CPU, where ``pack_padded_sequence`` and host-side
        bookkeeping want them; list fields stay as they are."""
        return PackedBatch(
            self.inputs.to(device, non_blocking=non_blocking),
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
            self.lengths,
            self.indices,
            pad_id=self.pad_id,
            fields=_fields_to(self.fields, device, non_blocking),
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
            fields=_fields_pinned(self.fields),
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
        fields: the rows' other fields by name, in the caller's order (keyword-only;
            empty for rows that are not mappings): tensors or lists as in
            :class:`PackedBatch`; a token-level field (the collator's ``pad_fields``) is
            ``(B, T)``, aligned with ``inputs``, ``field_pad_value`` past each length.
    """

    inputs: torch.Tensor
    targets: torch.Tensor | None
    mask: torch.Tensor
    lengths: torch.Tensor
    fields: dict[str, Field] = field(default_factory=dict, kw_only=True)

    @property
    def num_tokens(self) -> int:
        """Real input tokens; with ``shift=True`` also the number of predicted targets."""
        return int(self.lengths.sum())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PaddedBatch:
        """Move ids, targets, mask and the tensor fields to ``device``; ``lengths`` stays
        on the CPU, list fields as they are."""
        return PaddedBatch(
            self.inputs.to(device, non_blocking=non_blocking),
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            self.lengths,
            fields=_fields_to(self.fields, device, non_blocking),
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
            fields=_fields_pinned(self.fields),
        )


def _fields_to(fields: dict[str, Field], device: torch.device | str, non_blocking: bool) -> dict[str, Field]:
    return {k: v if isinstance(v, list) else v.to(device, non_blocking=non_blocking) for k, v in fields.items()}


def _fields_pinned(fields: dict[str, Field]) -> dict[str, Field]:
    return {k: v if isinstance(v, list) else v.pin_memory() for k, v in fields.items()}


# ---------------------------------------------------------------------- helpers


def _token_lists(samples: Sequence[Sample], key: str) -> tuple[Sequence[Any], bool]:
    """The samples' token sequences, and whether the samples are rows (mappings)."""
    if not samples:
        raise ValueError("empty batch: the sampler gave no samples")
    if isinstance(samples[0], Mapping):
        return [s[key] for s in samples], True
    return samples, False


def _field_values(samples: Sequence[Mapping[str, Any]], key: str, who: str) -> dict[str, list]:
    """Every field of the rows but ``key``: name -> the rows' values, in the caller's order.

    Raises:
        ValueError: a row lacks a field another row has.
    """
    first = samples[0]
    n = len(first)
    # Rows hold the same fields iff every row has the first row's n names (checked as they
    # are read below) and no more: then each has >= n fields, so a total of n per row
    # means exactly n. Every row has ``key`` (read before), so n == 1 needs no reading.
    if sum(map(len, samples)) != n * len(samples):
        _unequal_fields(samples, who)
    if n == 1:
        return {}
    out = {}
    for name in first:
        if name != key:
            try:
                out[name] = [s[name] for s in samples]
            except KeyError:
                _unequal_fields(samples, who)
    return out


def _unequal_fields(samples: Sequence[Mapping[str, Any]], who: str) -> None:
    """Raise ``ValueError`` naming the first row whose fields differ from the first row's, and how."""
    first = set(samples[0])
    bad = next(i for i, s in enumerate(samples) if set(s) != first)
    missing, extra = sorted(first - set(samples[bad])), sorted(set(samples[bad]) - first)
    what = f"has no field(s) {missing}, which batch position 0 has" if missing else \
        f"has field(s) {extra} that batch position 0 lacks"
    raise ValueError(f"{who}: batch position {bad} {what} (its fields: {sorted(samples[bad])}); "
                     "every row needs the same fields")


def _collate_field(values: list) -> Field:
    """One per-row field: numbers become one tensor, anything else stays a list.

    Python ints become int64, bools bool, floats torch's default dtype (float32 unless
    set otherwise: what ``torch.tensor`` would make, and what a model's parameters are);
    equal-shape nested lists, numpy arrays and scalars are stacked (numpy dtypes kept),
    tensors of equal shape stacked. Strings, ``None``, ragged or mixed values: the list.
    numpy, not ``torch.tensor``: 1.7 against 9 us for 32 ints.
    """
    first = values[0]
    if isinstance(first, (str, bytes)) or first is None:
        return values
    if isinstance(first, torch.Tensor):
        try:
            return torch.stack(values)
        except (RuntimeError, TypeError):  # unequal shapes, or not all tensors
            return values
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):  # ragged
        return values
    if arr.dtype.kind not in "biuf":  # strings, objects (None, dicts, huge ints), dates
        return values
    try:
        out = torch.from_numpy(arr)
    except TypeError:  # a dtype this torch lacks (uint16..64 before torch 2.3)
        return values
    if arr.dtype == np.float64 and not isinstance(first, (np.ndarray, np.generic)):  # Python floats
        out = out.to(torch.get_default_dtype())
    return out


def _check_token_field(values: list, lens: list[int], name: str, key: str, who: str) -> None:
    """Raise ``ValueError`` unless every row's token-level field has one value per id."""
    flens = list(map(_len, values))
    if flens != lens:
        i = next(i for i, (a, b) in enumerate(zip(flens, lens)) if a != b)
        has = "a single value" if flens[i] is None else f"{flens[i]} values"
        raise ValueError(f"{who}: batch position {i}: token-level field {name!r} has {has} but "
                         f"{key!r} has {lens[i]} ids; a packed or padded field needs one value per id")


def _len(v: Any) -> int | None:
    try:
        return len(v)
    except TypeError:  # a number (or a 0-d array): no length
        return None


def _flat_field(values: Sequence[Any], total: int, name: str, who: str) -> np.ndarray:
    """A token-level field's rows back to back, as one flat numpy array.

    Integers become int64, like the ids (and as ``cross_entropy`` wants its targets);
    Python floats torch's default dtype (as :func:`_collate_field`); bools, and floats
    given as arrays or tensors, keep their dtype.

    Raises:
        ValueError: a value per id that is not a single number.
        TypeError: values that are not numbers.
    """
    first = values[0]
    if isinstance(first, np.ndarray):
        flat = np.concatenate(values)
    elif isinstance(first, torch.Tensor):
        flat = torch.cat(values).numpy(force=True)
    else:
        try:
            flat = np.array(list(chain.from_iterable(values)))
        except (TypeError, ValueError):  # mixed forms, or nested ragged values: let the shape check say it
            flat = np.concatenate([np.asarray(v) for v in values])
        if flat.dtype == np.float64:  # Python floats
            flat = flat.astype(_NUMPY_FLOAT.get(torch.get_default_dtype(), np.float32))
    if flat.ndim != 1 or flat.size != total:
        raise ValueError(f"{who}: token-level field {name!r} must hold one number per id, got shape "
                         f"{flat.shape} for {total} ids")
    if flat.dtype.kind not in "biuf":
        raise TypeError(f"{who}: token-level field {name!r} must hold numbers, got dtype {flat.dtype}")
    return flat.astype(np.int64, copy=False) if flat.dtype.kind in "iu" else flat


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
    flat: np.ndarray, runs: list[tuple[int, int]], shift: bool, targets: bool = True, dtype: Any = np.int64
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pack a batch made of a few runs of equal length, with strided block copies.

    The sequences of one run form a (count, length) grid of ``flat``; steps where runs
    ``0..b`` are active form a block of the packed data, filled column-wise from those
    grids, transposed. That is ``k(k+1)/2`` copies for ``k`` runs and no index arrays.

    Args:
        flat: (sum L,) the sequences back to back, longest first.
        runs: ``(length, count)`` per run, longest first.
        shift: pack ``seq[:-1]`` (and make the targets ``seq[1:]``).
        targets: with ``shift``, also make the targets (a token-level field needs none:
            its values are cut like the inputs).
        dtype: of the packed arrays.

    Returns:
        ``(inputs, targets, batch_sizes)``: (N,) ``dtype``, (N,) ``dtype`` or ``None``, (T,) int64.
    """
    T = runs[0][0] - shift
    targets = targets and shift
    if len(runs) == 1:  # a plain transpose
        grid = flat.reshape(runs[0][1], runs[0][0])  # (B, L)
        inputs = np.ascontiguousarray(grid[:, :T].T, dtype=dtype).reshape(-1)  # (T*B,)
        nexts = np.ascontiguousarray(grid[:, 1:].T, dtype=dtype).reshape(-1) if targets else None
        return inputs, nexts, np.full(T, runs[0][1], dtype=np.int64)
    grids, start, cols = [], 0, 0
    for length, count in runs:  # (grid (count, length), first column, last column + 1)
        grids.append((flat[start : start + length * count].reshape(count, length), cols, cols + count))
        start, cols = start + length * count, cols + count
    inputs = np.empty(start - shift * cols, dtype=dtype)  # (N,)
    nexts = np.empty_like(inputs) if targets else None
    batch_sizes = np.empty(T, dtype=np.int64)  # (T,)
    pos, t0 = 0, 0
    for b in range(len(runs) - 1, -1, -1):  # earliest steps first; runs 0..b are active there
        t1, width = runs[b][0] - shift, grids[b][2]
        n = (t1 - t0) * width
        batch_sizes[t0:t1] = width
        for out, lag in ((inputs, 0), (nexts, 1)) if targets else ((inputs, 0),):
            block = out[pos : pos + n].reshape(t1 - t0, width)  # (steps, active sequences)
            for grid, j0, j1 in grids[: b + 1]:
                block[:, j0:j1] = grid[:, t0 + lag : t1 + lag].T
        pos, t0 = pos + n, t1
    return inputs, nexts, batch_sizes


def _pack_gather(
    flat: np.ndarray, lengths: np.ndarray, shift: bool, targets: bool = True, dtype: Any = np.int64
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pack any batch with one index gather: step ``t`` of the ``j``-th sequence is read
    from ``starts[j] + t`` and lands at ``sum(batch_sizes[:t]) + j``.

    Args:
        flat: (sum L,) the sequences back to back, longest first.
        lengths: (B,) their lengths, descending.
        shift, targets, dtype: as :func:`_pack_runs`.

    Returns:
        as :func:`_pack_runs`.
    """
    steps = lengths - shift  # (B,)
    t = np.arange(steps[0])[:, None]  # (T, 1)
    active = t < steps  # (T, B)
    src = (np.cumsum(lengths) - lengths + t)[active]  # (N,) flat position of every packed token
    flat = flat.astype(dtype, copy=False)
    return flat[src], flat[src + 1] if targets and shift else None, active.sum(1)


def _pack(
    flat: np.ndarray, runs: list[tuple[int, int]], lengths: np.ndarray | None, shift: bool, targets: bool = True,
    dtype: Any = np.int64,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pack by :func:`_pack_runs` or :func:`_pack_gather`, whichever is faster for ``runs``.

    The ids and every token-level field of a batch go through here with the same
    ``runs`` and ``lengths``, so their packed data line up position by position.

    Args:
        flat: (sum L,) the sequences back to back, longest first.
        runs: ``(length, count)`` per run, longest first.
        lengths: (B,) the sequences' lengths, descending; read only beyond
            ``_MAX_RUNS`` runs (``None`` will do for fewer).
        shift, targets, dtype: as :func:`_pack_runs`.

    Returns:
        as :func:`_pack_runs`.
    """
    # Bucketed batches hold a few distinct lengths: block copies beat an index gather
    # there (measured: 2 runs 1.2x, 3-4 runs 1.5x faster) and lose beyond ~5 runs.
    if len(runs) <= _MAX_RUNS:
        return _pack_runs(flat, runs, shift, targets, dtype)  # positional: this runs per batch
    return _pack_gather(flat, lengths, shift, targets, dtype)


# -------------------------------------------------------------------- collators


class PackedCollator:
    """Collate token sequences into a :class:`PackedBatch`, for ``DataLoader(collate_fn=...)``.

    Samples are concatenated once, longest first, into a flat array, which is packed
    without a padded tensor in between: a batch of equal lengths (most batches from
    :class:`~pipeline.sampling.BucketBatchSampler`) is a transpose of its ``(B, L)``
    grid; a few distinct lengths take one strided block copy per run and time block;
    anything else one index gather (step ``t`` of the ``j``-th longest sequence lands at
    ``sum(batch_sizes[:t]) + j``). Ties in length keep the caller's order.

    Other fields of dict rows (a Hugging Face ``Dataset``'s ``label``, ``id``, ...) come
    through in ``batch.fields``, by name, in the caller's order — the order of
    ``batch.lengths``, of ``pad_packed_sequence(batch.inputs)`` and of an RNN's ``h_n`` —
    never in the packed order, so a label can be lined up with its row's output without
    undoing the sort:

    * numbers become one tensor: Python ints int64, bools bool, floats torch's default
      dtype (float32 unless set otherwise — what ``torch.tensor`` makes, and what a
      model's parameters are); numpy scalars and equal-shape arrays (or nested lists) are
      stacked, numpy dtypes kept; equal-shape tensors stacked;
    * anything else (strings, ``None``, ragged lists) stays a list. The choice is made
      per batch: a field of varying length is a tensor in a batch whose rows happen to
      agree — name token-level fields in ``pack_fields``;
    * a field named in ``pack_fields`` is token-level (one value per id: POS or NER tags,
      per-token weights) and is packed like the ids, a ``PackedSequence`` with the inputs'
      very ``batch_sizes``, ``sorted_indices`` and ``unsorted_indices`` objects, so its
      ``data[k]`` belongs to ``inputs.data[k]``. Integer values become int64 (usable as
      ``cross_entropy`` targets as they come). With ``shift=True`` it is cut like the
      inputs, ``field[:-1]``: each value belongs to the token it was given for, which is
      an input token; the last token is only ever a target.

    Rows that are not mappings (lists, arrays, tensors) give empty ``fields``; rows with
    only ``key`` cost nothing extra.

    Args:
        pad_id: id :meth:`PackedBatch.padded` fills with (packing itself needs none).
        shift: make teacher-forcing pairs: inputs ``seq[:-1]``, targets ``seq[1:]``.
            ``False`` packs the sequences as they are (encoders), ``targets=None``.
        key: field holding the token ids when samples are dataset rows (mappings).
        pack_fields: names of token-level fields to pack like the ids.

    Raises (on call):
        ValueError: an empty batch, a sample with no tokens, or with ``shift=True`` a
            sample with a single token (no target) — filter those when preparing data;
            rows without the same fields (naming the field and the batch position); a
            ``pack_fields`` field not one value per id (naming both, and the lengths);
            ``pack_fields`` with rows that are not mappings.
        TypeError: a ``pack_fields`` field that does not hold numbers.
    """

    def __init__(
        self, pad_id: int = 0, *, shift: bool = True, key: str = "input_ids", pack_fields: Sequence[str] = ()
    ) -> None:
        self.pad_id = pad_id
        self.shift = shift
        self.key = key
        self.pack_fields = _field_names(pack_fields, key, "pack_fields")

    def __repr__(self) -> str:
        return (f"PackedCollator(pad_id={self.pad_id}, shift={self.shift}, key={self.key!r}, "
                f"pack_fields={self.pack_fields})")

    def __call__(self, samples: Sequence[Sample]) -> PackedBatch:
        """Pack ``samples`` (a list of token sequences, or of rows with ``key``).

        Returns:
            a :class:`PackedBatch` whose ``indices`` are positions in ``samples`` and whose
            ``fields`` hold the rows' other fields, in the caller's order.
        """
        seqs, rows = _token_lists(samples, self.key)
        lens, shortest, longest = _lengths(seqs, self.shift, "PackedCollator")
        B = len(lens)
        if shortest == longest:  # common after bucketing: already in order, one run
            order = unsorted = np.arange(B)
            arrange = None
            runs = [(longest, B)]
            full = None  # one run: _pack copies blocks and needs no lengths
            lengths = np.full(B, longest - self.shift, dtype=np.int64)  # (B,)
        else:
            full = np.array(lens, dtype=np.int64)  # (B,)
            order = np.argsort(-full, kind="stable")  # (B,) longest first; ties keep the caller's order
            unsorted = np.argsort(order)
            arrange = itemgetter(*order)
            runs = sorted(Counter(lens).items(), reverse=True)  # (length, count), longest first
            lengths = full - self.shift  # (B,)
            full = full[order] if len(runs) > _MAX_RUNS else None  # (B,) descending, for an index gather
        flat = _concat(seqs if arrange is None else arrange(seqs), sum(lens))  # (sum L,) longest first

        # THE one place in the toolkit where targets are shifted: inputs seq[:-1], targets seq[1:].
        inputs, targets, batch_sizes = _pack(flat, runs, full, self.shift)

        sorted_t, unsorted_t, bs_t = torch.from_numpy(order), torch.from_numpy(unsorted), torch.from_numpy(batch_sizes)
        batch = PackedBatch(
            PackedSequence(torch.from_numpy(inputs), bs_t, sorted_t, unsorted_t),
            None if targets is None else PackedSequence(torch.from_numpy(targets), bs_t, sorted_t, unsorted_t),
            torch.from_numpy(lengths),
            sorted_t,
            pad_id=self.pad_id,
        )
        # Lists, arrays, tensors and rows of the ids alone (one field each, ``key``) carry
        # nothing more: they skip the fields' code (its own checks raise for the rest).
        if (rows and sum(map(len, samples)) != B) or self.pack_fields:
            batch.fields = self._fields(samples, rows, lens, arrange, runs, full, batch.inputs)
        return batch

    def _fields(
        self, samples: Sequence[Any], rows: bool, lens: list[int], arrange: itemgetter | None,
        runs: list[tuple[int, int]], full: np.ndarray | None, inputs: PackedSequence,
    ) -> dict[str, Field]:
        """The rows' other fields: per-row ones in the caller's order, ``pack_fields`` packed
        by the ids' ``runs`` (and ``full``, the sorted lengths), in the ids' sorted order
        (``arrange``), sharing ``inputs``' ``batch_sizes`` and index tensors."""
        values = _field_values(samples, self.key, "PackedCollator") if rows else {}
        if self.pack_fields:
            _check_pack_fields(self.pack_fields, values, rows, "PackedCollator", "pack_fields")
        fields: dict[str, Field] = {}
        for name, vals in values.items():
            if name not in self.pack_fields:
                fields[name] = _collate_field(vals)  # caller's order, as the rows came
                continue
            _check_token_field(vals, lens, name, self.key, "PackedCollator")
            ff = _flat_field(vals if arrange is None else arrange(vals), sum(lens), name, "PackedCollator")
            # the ids' runs and lengths, cut like the inputs (no targets): data[k] belongs to inputs.data[k]
            data, _, _ = _pack(ff, runs, full, self.shift, False, ff.dtype)
            fields[name] = inputs._replace(data=torch.from_numpy(data))
        return fields


class PadCollator:
    """Collate token sequences into a padded, batch-first :class:`PaddedBatch`.

    For consumers that cannot take a ``PackedSequence`` (ONNX export, attention
    models). Samples keep the caller's order.

    Other fields of dict rows come through in ``batch.fields`` as with
    :class:`PackedCollator` (tensors or lists, caller's order); a field named in
    ``pad_fields`` is token-level and is padded like the ids into a ``(B, T)`` tensor
    aligned with ``inputs`` (cut like them with ``shift=True``; integers as int64),
    ``field_pad_value`` past each length.

    Args:
        pad_id: id filling ``inputs`` past each length.
        shift: as :class:`PackedCollator`: inputs ``seq[:-1]``, targets ``seq[1:]``.
        key: field holding the token ids when samples are dataset rows (mappings).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        target_pad_id: id filling ``targets`` past each length; the default ``-100``
            is ``cross_entropy``'s ``ignore_index``, so padded targets need no mask.
        pad_fields: names of token-level fields to pad like the ids.
        field_pad_value: what fills ``pad_fields`` past each length, one value or a
            ``{name: value}`` mapping; the default ``-100`` is ``cross_entropy``'s
            ``ignore_index`` (transformers' ``label_pad_token_id``), so padded tags need
            no mask. A value the field's dtype cannot hold (``-100`` in a bool field) is
            a ``ValueError``.

    Raises (on call):
        ValueError, TypeError: as :class:`PackedCollator`.
    """

    def __init__(
        self,
        pad_id: int = 0,
        *,
        shift: bool = True,
        key: str = "input_ids",
        pad_to_multiple_of: int | None = None,
        target_pad_id: int = -100,
        pad_fields: Sequence[str] = (),
        field_pad_value: float | Mapping[str, float] = -100,
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_id = pad_id
        self.shift = shift
        self.key = key
        self.pad_to_multiple_of = pad_to_multiple_of
        self.target_pad_id = target_pad_id
        self.pad_fields = _field_names(pad_fields, key, "pad_fields")
        if isinstance(field_pad_value, Mapping) and set(field_pad_value) - set(self.pad_fields):
            raise ValueError(f"field_pad_value names {sorted(set(field_pad_value) - set(self.pad_fields))}, "
                             f"which are not in pad_fields={self.pad_fields}")
        self.field_pad_value = field_pad_value

    def __repr__(self) -> str:
        return (
            f"PadCollator(pad_id={self.pad_id}, shift={self.shift}, key={self.key!r}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of}, target_pad_id={self.target_pad_id}, "
            f"pad_fields={self.pad_fields}, field_pad_value={self.field_pad_value!r})"
        )

    def __call__(self, samples: Sequence[Sample]) -> PaddedBatch:
        """Pad ``samples`` (a list of token sequences, or of rows with ``key``).

        Returns:
            a :class:`PaddedBatch` in the caller's order, the rows' other fields in ``fields``.
        """
        seqs, rows = _token_lists(samples, self.key)
        lens, _, longest = _lengths(seqs, self.shift, "PadCollator")
        total = sum(lens)
        flat = _concat(seqs, total).astype(np.int64, copy=False)
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
        batch = PaddedBatch(
            torch.from_numpy(inputs),
            None if targets is None else torch.from_numpy(targets),
            torch.from_numpy(mask),
            torch.from_numpy(steps),
        )
        if (rows and sum(map(len, samples)) != len(lens)) or self.pad_fields:  # as in PackedCollator
            batch.fields = self._fields(samples, rows, lens, mask, src)
        return batch

    def _fields(
        self, samples: Sequence[Any], rows: bool, lens: list[int], mask: np.ndarray, src: np.ndarray
    ) -> dict[str, Field]:
        """The rows' other fields: per-row ones in the caller's order, ``pad_fields`` padded
        like the ids (``mask`` and ``src``: where each real input token sits, and where
        in the rows laid end to end it came from)."""
        values = _field_values(samples, self.key, "PadCollator") if rows else {}
        if self.pad_fields:
            _check_pack_fields(self.pad_fields, values, rows, "PadCollator", "pad_fields")
        fields: dict[str, Field] = {}
        for name, vals in values.items():
            if name not in self.pad_fields:
                fields[name] = _collate_field(vals)
                continue
            _check_token_field(vals, lens, name, self.key, "PadCollator")
            ff = _flat_field(vals, sum(lens), name, "PadCollator")  # (sum L,) caller's order
            padded = np.full(mask.shape, self._pad_value(name, ff.dtype), dtype=ff.dtype)  # (B, T)
            padded[mask] = ff[src]  # the inputs' positions: cut like them with shift
            fields[name] = torch.from_numpy(padded)
        return fields

    def _pad_value(self, name: str, dtype: np.dtype) -> Any:
        v = self.field_pad_value
        v = v.get(name, -100) if isinstance(v, Mapping) else v
        with np.errstate(invalid="ignore", over="ignore"):
            try:
                fits = np.array(v).astype(dtype) == v or (dtype.kind == "f" and np.isnan(v))
            except (OverflowError, ValueError, TypeError):
                fits = False
        if not fits:
            raise ValueError(f"PadCollator: field_pad_value={v!r} does not fit pad field {name!r} of dtype {dtype}; "
                             f"pass field_pad_value={{{name!r}: <a {dtype} value>}}")
        return v


def _field_names(names: Sequence[str], key: str, what: str) -> tuple[str, ...]:
    """``names`` as a tuple, checked: strings, not ``key`` (the ids are packed anyway)."""
    if isinstance(names, str):
        names = (names,)  # pack_fields="tags" means the one field
    names = tuple(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be field names (strings), got {names!r}")
    if key in names:
        raise ValueError(f"{what} names {key!r}, the ids themselves (key={key!r}); list only the other token-level fields")
    return names


def _check_pack_fields(names: tuple[str, ...], values: dict[str, list], rows: bool, who: str, what: str) -> None:
    """Raise ``ValueError`` if a field named in ``names`` is not in the rows."""
    missing = [n for n in names if n not in values]
    if not missing:
        return
    if not rows:
        raise ValueError(f"{who}: {what}={names} needs dict rows (a dataset's rows), but the samples are not mappings")
    raise ValueError(f"{who}: {what} names {missing}, which the rows do not have (their fields: {sorted(values)})")
