"""Stream mode: a split read as one continuous text, in truncated-BPTT windows.

This is the protocol every published WikiText-2 / Penn Treebank perplexity uses
(Zaremba et al. 2014, pytorch/examples, AWD-LSTM): the hidden state is carried across
the whole text instead of restarting at every line.

The stream is read straight from the prepared Arrow files, no copy of the corpus in
memory and no new prepare format. A prepared row is ``<bos> w1 ... wn <eos>``; the
stream is the first row's ``<bos>`` followed by every row without its first id::

    rows     [<bos> a b <eos>] [<bos> c <eos>] [<bos> d e f <eos>]
    stream   <bos> a b <eos> c <eos> d e f <eos>          (N + 1 ids)

so a line ends in ``<eos>`` and the next line follows it directly, and the number of
predicted ids ``N`` is exactly the split's predicted tokens (the published counts:
WikiText-2 2,088,628 / 217,646 / 245,569). A row cut by ``overflow: split`` starts with
the last id of the row before it, so dropping every row's first id is right there too.

The ``N`` predicted positions are cut into ``B`` contiguous streams (pytorch/examples'
``batchify``), read side by side in windows of ``bptt`` predictions::

    stream 0   |-- window 0 --|-- window 1 --|-- ...
    stream 1   |-- window 0 --|-- window 1 --|-- ...

A window is ``B`` id sequences of ``bptt + 1`` ids (inputs and, shifted by the collator,
targets: consecutive windows overlap by one id), collated by :class:`PackedCollator`
like any other batch; the trainer carries each stream's final state into its next window.

* Evaluation (``exact=True``): no position is dropped; the first ``N % B`` streams are
  one id longer, and in the last windows the streams that have run out drop off the
  end of the batch (they are always a suffix, so the carried state is narrowed).
* Training (``exact=False``): every stream has ``N // B`` predictions (the remainder,
  fewer than ``B`` ids, is not trained on, as in ``batchify``), so every window is
  ``B x bptt`` and ranks under DDP take equal steps. With ``variable=True`` the window
  length is drawn per step as AWD-LSTM does (``bptt`` with probability 0.95, else
  ``bptt / 2``, then ``N(that, 5)``, at least 5), from a generator seeded by (seed,
  epoch), so every rank draws the same lengths and a resumed epoch the same plan.

This module needs numpy and the prepared data only (no torch, no tokenizers).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.data import TokenDataset

__all__ = ["StreamWindows"]


class StreamWindows:
    """A prepared split as ``B`` parallel streams read in windows of ``bptt`` predictions.

    Args:
        dataset: one split of a prepared folder.
        num_streams: ``B``, streams over all ranks (pytorch/examples' batch size).
        bptt: predictions per window (the truncation length).
        exact: keep every predicted position (evaluation); ``False`` trims the stream
            to a multiple of ``B`` (training).
        variable: AWD-LSTM's random window lengths (training only).
        seed: seeds the window lengths with ``variable`` (with the epoch).
        num_replicas, rank: under DDP each rank reads its own contiguous block of
            ``B / num_replicas`` streams (``B`` must divide).

    Iterating yields, per window, a list of id arrays (this rank's active streams, in
    stream order), ready for ``PackedCollator(shift=True)``.

    Raises:
        ValueError: ``B`` does not divide by ``num_replicas``, or the split is too short
            for ``B`` streams.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        num_streams: int,
        bptt: int,
        *,
        exact: bool = True,
        variable: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_streams < 1 or bptt < 1:
            raise ValueError(f"num_streams={num_streams} and bptt={bptt} must be >= 1")
        if num_streams % num_replicas:
            raise ValueError(f"{num_streams} streams cannot be shared by {num_replicas} ranks: make it a multiple")
        self.dataset, self.bptt, self.exact, self.variable, self.seed = dataset, bptt, exact, variable, seed
        self.num_streams = num_streams
        lengths = dataset.lengths
        if len(lengths) == 0:
            raise ValueError(f"the {dataset.split} split is empty")
        # stream position of each row's second id: row r supplies positions [p[r], p[r] + len_r - 1)
        self._p = np.concatenate([[1], 1 + np.cumsum(lengths - 1)])[:-1].astype(np.int64)  # (rows,)
        n = int(lengths.sum() - len(lengths))  # predicted positions 1..n
        self.num_predicted = n
        per, extra = divmod(n, num_streams)
        if per < 1:
            raise ValueError(f"the {dataset.split} split has {n} tokens, fewer than {num_streams} streams")
        sizes = np.full(num_streams, per, dtype=np.int64)
        if exact:
            sizes[:extra] += 1
        starts = 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]])  # first predicted position of each stream
        local = num_streams // num_replicas
        block = slice(rank * local, (rank + 1) * local)
        self._starts, self._sizes = starts[block], sizes[block]  # this rank's streams
        self.epoch = 0
        self.position = 0  # windows of this epoch already yielded (or consumed, after a resume)
        self._resume = False  # the next iteration continues from a restored position
        self._plan = self._make_plan()

    # -- the plan: window lengths of the epoch --------------------------------------------

    def _make_plan(self) -> np.ndarray:
        """Cumulative start offset of every window within a stream: ``(windows + 1,)``."""
        longest = int(self._sizes.max()) if len(self._sizes) else 0
        if not self.variable:
            return np.append(np.arange(0, longest, self.bptt), longest)
        rng = np.random.default_rng([self.seed, self.epoch])
        offsets, at = [0], 0
        while at < longest:
            base = self.bptt if rng.random() < 0.95 else self.bptt / 2
            at = min(longest, at + max(5, int(rng.normal(base, 5))))
            offsets.append(at)
        return np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        """Windows per epoch (exact: every rank has the same number)."""
        return len(self._plan) - 1

    def window_length(self, i: int) -> int:
        """Predictions per stream in window ``i`` (the full ones; the last may be shorter)."""
        return int(self._plan[i + 1] - self._plan[i])

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (a new plan with ``variable``); keeps a restored mid-epoch position."""
        if epoch != self.epoch:
            self.epoch, self.position, self._resume = epoch, 0, False
            self._plan = self._make_plan()

    def state_dict(self, windows_consumed: int | None = None) -> dict:
        """Where the epoch is: ``{"epoch", "position"}`` (windows already trained on)."""
        return {"epoch": self.epoch, "position": self.position if windows_consumed is None else windows_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._plan = self._make_plan()
        self.position = int(state["position"])
        self._resume = True

    # -- reading -------------------------------------------------------------------------

    def _ids(self, positions: np.ndarray) -> np.ndarray:
        """Stream ids at ``positions`` (any shape), gathered from the memory-mapped rows."""
        ds = self.dataset
        row = np.maximum(np.searchsorted(self._p, positions, side="right") - 1, 0)
        offset = positions - self._p[row] + 1  # position 0 is row 0's <bos>, offset 0
        chunk = np.searchsorted(ds._chunk_ends, row, side="right")
        flat = ds._starts[row] + offset
        if len(ds._values) == 1:
            return ds._values[0][flat]
        out = np.empty(positions.shape, dtype=ds._values[0].dtype)
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = ds._values[c][flat[sel]]
        return out

    def window(self, i: int) -> list[np.ndarray]:
        """Window ``i``: per active stream, the ids of its inputs and targets (length + 1)."""
        lo, hi = int(self._plan[i]), int(self._plan[i + 1])
        take = np.minimum(self._sizes, hi) - lo  # (B_local,) predictions in this window
        active = int((take > 0).sum())  # the exhausted streams are a suffix
        width = hi - lo + 1
        pos = self._starts[:active, None] - 1 + lo + np.arange(width)  # (b, width)
        ids = self._ids(np.minimum(pos, (self._starts + self._sizes - 1)[:active, None]))
        return [ids[b, : take[b] + 1] for b in range(active)]

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        """The epoch's windows; right after :meth:`load_state_dict`, the rest of it."""
        if not self._resume:
            self.position = 0
        self._resume = False
        while self.position < len(self):
            i = self.position
            self.position += 1
            yield self.window(i)
