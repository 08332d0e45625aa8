"""Length bucketing for streams: :class:`StreamBucketBatcher`, and encoded rows read with
``datasets.load_dataset(..., streaming=True)`` (:func:`stream_splits`).

:class:`BucketBatchSampler` needs every length up front; a stream (a Hugging Face
``IterableDataset``, a generator, a file read line by line) has none. The batcher keeps a
bounded buffer of rows, grouped into length bins estimated from the first rows (as
lhotse's ``DynamicBucketingSampler`` does with durations), and cuts each batch from one
bin, sorted by length, so rows of a batch have nearly equal lengths.

This module imports torch and numpy only; :func:`stream_splits` imports ``datasets``
and ``tokenizers`` when called.
"""
from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.sampling import Cost, check_budget, check_fits

if TYPE_CHECKING:
    from pipeline.encode import Encoder

__all__ = ["StreamBucketBatcher", "open_stream", "stream_splits", "until_first_rank_ends"]


class StreamBucketBatcher(IterableDataset):
    """Batches of similar-length rows from a stream, in bounded memory.

    A pass (one epoch) over ``source``:

    1. **Shard.** The stream's items are numbered 0, 1, 2, ...; with ``S`` shards
       (``num_replicas`` ranks x DataLoader workers) shard ``k = rank * workers +
       worker`` keeps the items ``i`` with ``i % S == k``. Every item lands in exactly
       one shard, whatever the source (each shard reads the stream and skips the others'
       items; for a Hugging Face dataset with many files, ``split_dataset_by_node``
       before the batcher saves that reading). A Hugging Face ``IterableDataset``
       splits itself between DataLoader workers (by file: with one file, one worker
       reads and the others idle), so for it only ranks are sharded here.
    2. **Bins.** ``bins`` (ascending upper length edges) if given; else quantiles of the
       first ``bin_sample`` lengths of the shard, ``num_bins`` of them.
    3. **Buffer.** Rows enter their bin, ordered by (length, stream position). When
       ``buffer_size`` rows are held, one batch leaves: a bin is drawn (seeded; chance
       proportional to its rows, among bins holding more than one batch's budget, else
       the fullest), and the batch is the run of the bin's sorted rows from a drawn start,
       extended to longer rows until the budget is met, then to shorter ones.
    4. **Budget.** At most ``batch_size`` rows and/or ``max_tokens`` tokens, counted
       by ``cost``: ``"unpadded"`` = sum of lengths (a packed RNN), ``"padded"`` = rows x
       longest. A row longer than ``max_tokens`` raises ``ValueError``.
    5. **End.** When the stream ends, every bin is cut into batches (the last of a bin
       may be short), and those batches come out in a seeded random order.

    Rows are yielded in the form they came, longest first in a batch (equal lengths: later
    stream position first; in a stream of mixed forms, other rows before dict rows before
    lists). A list, or a dict row whose one field is a list, comes back as a new, equal
    list or dict: while buffered its ids are held flat, end to end with the ids of rows
    as long, where Python's garbage collector has nothing per row to track (ten thousand
    held lists would bring on full collections of the whole heap). Any other row (an
    array, a tuple, a dict with more fields) is held and yielded as is.
    Randomness comes from ``np.random.default_rng([seed, epoch, shard])``; call
    :meth:`set_epoch` before each pass (also passed on to ``source.set_epoch``, which a
    Hugging Face ``IterableDataset`` uses to reshuffle).

    Memory: the buffer (``buffer_size`` rows, list rows' ids held in one list per length),
    nothing per stream item.

    Distributed training: ranks get different numbers of batches (their shards differ),
    and the batcher itself never communicates. So that the uneven end of an epoch does
    not hang a rank in a collective, either iterate through :func:`until_first_rank_ends`
    (every rank stops at the first rank's end; the few batches the others still held are
    dropped for that epoch — the policy for a trainer that all-reduces every step), or,
    when gradient all-reduces are the only collectives, train the epoch under
    ``DistributedDataParallel.join()``, which lets finished ranks shadow them, so every
    row trains exactly once.

    Resuming: :meth:`state_dict` taken between batches of a pass (the trainer's loop, with
    ``num_workers=0``) holds the shard's stream position, the buffered rows and the
    generator state; a batcher given it by :meth:`load_state_dict` continues that pass
    with exactly the batches the first one would have yielded next. The stream is
    re-opened and the consumed items skipped (read, not re-emitted); with DataLoader
    workers the state lives in the workers (use torchdata's ``StatefulDataLoader``).

    Args:
        source: an iterable of rows, iterated once per pass (list, ``IterableDataset``),
            or a zero-argument callable returning a fresh iterator (for generators).
        batch_size: most rows per batch.
        max_tokens: token budget per batch, counted by ``cost``. At least one of the two.
        cost: ``"unpadded"`` or ``"padded"``, as above.
        buffer_size: rows held before a batch leaves (memory vs. padding efficiency).
        bins: ascending upper length edges; a row goes to the first bin whose edge is
            ``>=`` its length (past the last: the last bin). ``None``: estimated.
        num_bins: bins to estimate when ``bins`` is ``None``.
        bin_sample: how many first lengths of a shard estimate the bins.
        shuffle: seeded draws; ``False`` takes the fullest bin from its shortest rows
            and emits the end batches in bin order (deterministic, for evaluation).
        seed: base seed; the same on every rank.
        key: the field holding the ids in dict rows.
        num_replicas, rank: the DDP world; ``None`` reads ``torch.distributed`` if it is
            initialised, else 1 and 0.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterator[Any]],
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        cost: Cost = "unpadded",
        buffer_size: int = 10_000,
        bins: Sequence[int] | None = None,
        num_bins: int = 32,
        bin_sample: int = 1_000,
        shuffle: bool = True,
        seed: int = 0,
        key: str = "input_ids",
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        check_budget(batch_size, max_tokens, cost)
        if buffer_size < 1 or num_bins < 1 or bin_sample < 1:
            raise ValueError(f"buffer_size, num_bins, bin_sample must be >= 1, got {buffer_size}, {num_bins}, {bin_sample}")
        if bins is not None and (not len(bins) or list(bins) != sorted(set(bins))):
            raise ValueError(f"bins must be strictly ascending length edges, got {list(bins)}")
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")
        self.source = source
        self.batch_size, self.max_tokens, self.cost = batch_size, max_tokens, cost
        self.buffer_size, self.num_bins, self.bin_sample = buffer_size, num_bins, bin_sample
        self.bins = None if bins is None else [int(b) for b in bins]
        self.shuffle, self.seed, self.key = shuffle, int(seed), key
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._live: _Pass | None = None  # the pass being iterated in this process
        self._restore: dict | None = None  # a loaded state, for the next pass
        self._finished: dict | None = None  # the state at the end of the last complete pass

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass's draws (and the source's, if it has ``set_epoch``)."""
        if self._restore is not None and self._restore["epoch"] != int(epoch):
            self._restore = None  # a loaded state belongs to its own epoch only
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if type(self.source).__module__.startswith("datasets."):
            # a Hugging Face IterableDataset splits itself between DataLoader workers (by file)
            workers, worker = 1, 0
        return self.num_replicas * workers, self.rank * workers + worker

    def __iter__(self) -> Iterator[list[Any]]:
        num_shards, shard = self._shard()
        state, self._restore = self._restore, None
        if state is not None and (state["num_shards"], state["shard"]) != (num_shards, shard):
            raise ValueError(f"state of shard {state['shard']}/{state['num_shards']} loaded into shard {shard}/{num_shards}")
        p = _Pass(self, num_shards, shard, state)
        self._live, self._finished = p, None
        try:
            yield from p.run()
            self._finished = p.state()  # a checkpoint after the last batch must not replay the epoch
        finally:
            if self._live is p:
                self._live = None

    # ---------------------------------------------------------------- resume

    def _config(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "max_tokens": self.max_tokens, "cost": self.cost,
                "buffer_size": self.buffer_size, "bins": self.bins, "num_bins": self.num_bins,
                "bin_sample": self.bin_sample, "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The pass in progress; after a complete pass, its end (loading it makes the next
        pass of that epoch empty; ``set_epoch(epoch + 1)`` starts the next one); before
        any pass, the start of the current epoch.

        Returns:
            ``{"epoch", "num_shards", "shard", "consumed", "bins", "buffer", "rng",
            "upstream", "config"}``: plain Python values and the buffered rows; save it
            with ``torch.save``.
        """
        if self._live is not None:
            return self._live.state()
        if self._restore is not None:
            return self._restore
        if self._finished is not None and self._finished["epoch"] == self.epoch:
            return self._finished
        num_shards, shard = self._shard()
        return {"epoch": self.epoch, "num_shards": num_shards, "shard": shard, "consumed": 0, "bins": self.bins,
                "buffer": [], "rng": None, "upstream": None, "done": False, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue from ``state``.

        Raises:
            ValueError: the state was saved with other options (its draws would differ).
        """
        mine = self._config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            raise ValueError("batcher state does not match: " + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        self.epoch = int(state["epoch"])
        self._restore = state


# A group's fields (its rows are all one length; each part in stream order):
_LISTS, _NLISTS, _DICTS, _NDICTS, _OBJECTS, _BIN = range(6)
_CHUNK = 256  # most rows read at once (rows read but not yet held live through collections)


def _size(g: list) -> int:
    """Rows in group ``g``."""
    return g[_NLISTS] + g[_NDICTS] + len(g[_OBJECTS])


class _Pass:
    """One pass of one shard: the buffer, the draws, the stream position.

    Held rows are grouped by length; a bin is the groups of its lengths (``lengths[bin]``,
    ascending), so in (length, form, position) order a bin is its groups one after
    another: a batch is cut by walking a few groups, and no row is ever sorted or
    compared. A group, ``by_len[length]``, is ``[lists, n_lists, dicts, n_dicts, objects,
    bin]``, its rows in three parts, each in stream order: the list rows, their token ids
    laid end to end in one list (``lists``, each row ``length`` long); the one-field
    ``{key: list}`` rows, the same way (``dicts``); and any other rows as the objects
    themselves (``objects``: arrays, tuples, dicts with more fields).

    Why flat: a held Python list (and its dict) is a container the garbage collector
    tracks. Ten thousand of them outlive the young generations, are promoted to the
    oldest and bring on full collections of the whole heap (~0.13 s each with torch and
    ``datasets`` loaded); a tuple per row would instead be traversed once at its first
    collection. A few long group lists hold the same ids with nothing per row to track,
    and a row's list leaves as one slice of its group's list. Groups stay for the pass
    once made, and the tail's batches are made as they leave (:meth:`_drain`), for the
    same reason.

    Rows are read in chunks of at most ``_CHUNK``, never past the row that fills the buffer
    (a batch's worth at a time once it is full), so a batch leaves at the same row as if
    they were read one by one; a chunk of one form is held in one flat loop (:meth:`_hold`).
    """

    def __init__(self, b: StreamBucketBatcher, num_shards: int, shard: int, state: dict | None) -> None:
        self.b, self.num_shards, self.shard = b, num_shards, shard
        self.rng = np.random.default_rng([b.seed, b.epoch, shard])
        self.consumed = 0  # stream items read (all shards' items, this shard's kept)
        self.edges: list[int] | None = b.bins  # None: the first rows are read as a sample, to estimate them
        self.by_len: dict[int, list] = {}  # length -> its group
        self._new_bins()
        self.held = 0
        self.done = False  # the stream ended; the tail batches are being emitted
        self.tail: list[list | tuple] = []  # batches (rows, from a loaded state) or planned (bin, lo, hi) runs
        self.upstream = None
        if state is not None:
            self.consumed, self.edges, self.done, self.upstream = state["consumed"], state["bins"], state["done"], state["upstream"]
            if state["rng"] is not None:  # None: saved before the pass began
                self.rng.bit_generator.state = state["rng"]
            self._new_bins()
            for n, _, row in sorted(state["buffer"], key=lambda e: e[1]):  # each part of a group in stream order
                self._add(n, row)
            self.tail = [list(t) for t in state.get("tail", [])]

    def _new_bins(self) -> None:
        k = len(self.edges or ())
        self.lengths: list[list[int]] = [[] for _ in range(k)]  # per bin: its groups' lengths, ascending
        self.counts = [0] * k  # per bin: its rows
        self.tokens = [0] * k  # per bin: the sum of its lengths
        self.longest = [0] * k  # per bin: its longest length

    def _group(self, n: int) -> list:
        """A new, empty group for length ``n``, in its bin (past the last edge: the last bin;
        none yet while the sample is read)."""
        g = self.by_len[n] = [[], 0, [], 0, [], None]
        if self.edges is not None:
            self._bin(n, g)
        return g

    def _bin(self, n: int, g: list) -> int:
        """Put group ``g`` (length ``n``) in its bin; its rows count there from now."""
        i = g[_BIN] = min(bisect.bisect_left(self.edges, n), len(self.edges) - 1)
        bisect.insort(self.lengths[i], n)
        return i

    def _add(self, n: int, row: Any) -> None:
        """Hold one row of length ``n``, of any form."""
        g = self.by_len.get(n) or self._group(n)
        t = type(row)
        if t is list:
            g[_LISTS] += row
            g[_NLISTS] += 1
        elif t is dict and len(row) == 1 and type(ids := row.get(self.b.key)) is list:
            g[_DICTS] += ids
            g[_NDICTS] += 1
        else:
            g[_OBJECTS].append(row)
        self.held += 1
        i = g[_BIN]
        if i is None:  # the sample: binned when the bins are known
            return
        self.counts[i] += 1
        self.tokens[i] += n
        if n > self.longest[i]:
            self.longest[i] = n

    def _hold(self, chunk: list[Any], first: int) -> None:
        """Hold rows read from the stream, the first at stream position ``first``. A chunk of
        list rows (or of one-field ``{key: list}`` rows) goes through one flat loop, type
        checks done for the chunk in C (``map``, ``set``); any other chunk row by row."""
        b, key = self.b, self.b.key
        kinds, ids = set(map(type, chunk)), None
        if kinds == {list}:
            ids, part = chunk, _LISTS
        elif kinds == {dict} and set(map(len, chunk)) == {1}:
            try:
                ids, part = list(map(operator.itemgetter(key), chunk)), _DICTS
            except KeyError:  # row by row, where the missing field raises
                ids = None
            if ids is not None and set(map(type, ids)) != {list}:
                ids = None
        if ids is not None:
            lengths = list(map(len, ids))
        else:
            missing = next((j for j, r in enumerate(chunk) if isinstance(r, dict) and key not in r), None)
            if missing is not None:
                raise KeyError(f"stream item {first + missing * self.num_shards} has no field {key!r} "
                               f"(its fields: {', '.join(map(str, chunk[missing]))}); pass key=")
            lengths = [len(r[key]) if isinstance(r, dict) else len(r) for r in chunk]
        check_fits(lengths, b.max_tokens, lambda j: f"stream item {first + j * self.num_shards}")
        if ids is None or self.edges is None:
            for n, row in zip(lengths, chunk):
                self._add(n, row)
        else:  # as _add, for one part
            by_len, group, counts, tokens, longest, count = self.by_len, self._group, self.counts, self.tokens, self.longest, part + 1
            for row, n in zip(ids, lengths):
                g = by_len.get(n) or group(n)
                g[part] += row
                g[count] += 1
                i = g[_BIN]
                counts[i] += 1
                tokens[i] += n
                if n > longest[i]:
                    longest[i] = n
            self.held += len(chunk)

    def _take(self, g: list, n: int, a: int, z: int, remove: bool = True) -> list[Any]:
        """Rows ``a:z`` of group ``g`` (rows ``n`` long), in its order; removed if ``remove``."""
        out, start, key = [], 0, self.b.key
        for part, count in ((_LISTS, _NLISTS), (_DICTS, _NDICTS)):
            size = g[count]
            x, y = max(a - start, 0), min(z - start, size)
            start += size
            if x >= y:
                continue
            flat, offsets = g[part], range(x * n, y * n, n) if n else [0] * (y - x)
            out += [flat[o : o + n] for o in offsets] if part == _LISTS else [{key: flat[o : o + n]} for o in offsets]
            if remove:
                del flat[x * n : y * n]
                g[count] -= y - x
        objects = g[_OBJECTS]
        x, y = max(a - start, 0), min(z - start, len(objects))
        if x < y:
            out += objects[x:y]
            if remove:
                del objects[x:y]
        return out

    def state(self) -> dict[str, Any]:
        if self.done:  # every held row is in a planned tail batch
            held = []
        else:
            held = [(n, row) for n, g in self.by_len.items() for row in self._take(g, n, 0, _size(g), remove=False)]
        upstream = None
        src = self.b.source
        if hasattr(src, "state_dict") and callable(getattr(src, "load_state_dict", None)) and self.num_shards == 1:
            upstream = src.state_dict()
        return {"epoch": self.b.epoch, "num_shards": self.num_shards, "shard": self.shard, "consumed": self.consumed,
                "bins": self.edges, "buffer": [[n, j, row] for j, (n, row) in enumerate(held)],
                "rng": self.rng.bit_generator.state, "upstream": upstream, "done": self.done,
                "tail": [self._batch(t) for t in self.tail], "config": self.b._config()}

    # ---------------------------------------------------------------- the stream

    def _items(self) -> Iterator[Any]:
        """The stream from the first unconsumed item (every shard's items; :meth:`run` keeps its own)."""
        src = self.b.source
        if self.upstream is not None:
            src.load_state_dict(self.upstream)  # a Hugging Face IterableDataset resumes itself
            return iter(src)
        it = iter(src() if callable(src) and not hasattr(src, "__iter__") else src)
        return itertools.islice(it, self.consumed, None)  # re-read, not re-emitted

    def _estimate_bins(self) -> None:
        """Bins from the sample's lengths; its groups go to them."""
        lengths = np.repeat(np.array(list(self.by_len), dtype=np.int64), [_size(g) for g in self.by_len.values()])
        qs = np.quantile(lengths, np.linspace(0, 1, self.b.num_bins + 1)[1:], method="higher") if len(lengths) else [1]
        self.edges = sorted({int(q) for q in qs})
        self._new_bins()
        for n, g in self.by_len.items():
            i = self._bin(n, g)
            self.counts[i] += _size(g)
            self.tokens[i] += _size(g) * n
            if _size(g) and n > self.longest[i]:
                self.longest[i] = n

    # ---------------------------------------------------------------- batches

    def _over(self, n: int, total: int, longest: int) -> bool:
        """Whether ``n`` rows of ``total`` tokens, the longest ``longest``, exceed one batch's budget."""
        b = self.b
        if b.batch_size is not None and n > b.batch_size:
            return True
        return b.max_tokens is not None and (total if b.cost == "unpadded" else n * longest) > b.max_tokens

    def _run_of(self, i: int, start: int, below: bool = True) -> tuple[int, int]:
        """``(lo, hi)``: the run of bin ``i``'s rows, in (length, form, position) order, from
        index ``start`` up (then, if ``below``, under it) that fills the budget."""
        lengths, bs, mt = self.lengths[i], self.b.batch_size, self.b.max_tokens
        if mt is None:  # rows only
            hi = min(start + bs, self.counts[i])
            return (max(0, hi - bs) if below else start), hi
        # A group's rows are all as long, so the budget takes k of a group's rows at once.
        padded, cap = self.b.cost == "padded", bs or self.counts[i]

        def room(r: int, total: int, n: int, top: int) -> int:
            """Rows of length ``n`` that still fit ``r`` rows of ``total`` tokens, ``top`` the longest after."""
            if padded:
                return mt // top - r if top else cap
            return (mt - total) // n if n else cap  # an empty row costs nothing

        sizes = [_size(self.by_len[n]) for n in lengths]  # some may be 0: a group stays when it empties
        j, o = 0, start  # start is row o of group j
        while o >= sizes[j]:
            o -= sizes[j]
            j += 1
        hi, total, longest, jj, avail = start, 0, 0, j, sizes[j] - o
        while True:  # up: longer rows
            n = lengths[jj]
            k = min(avail, cap - (hi - start), room(hi - start, total, n, n))
            if k > 0:
                hi, total, longest = hi + k, total + k * n, n
            jj += 1
            if k < avail or jj == len(lengths):
                break
            avail = sizes[jj]
        lo, jj, avail = start, j, o
        while below:  # down: shorter rows; the longest stays
            if avail:
                n = lengths[jj]
                k = min(avail, cap - (hi - lo), room(hi - lo, total, n, longest))
                if k > 0:
                    lo, total = lo - k, total + k * n
                if k < avail:
                    break
            if jj == 0:
                break
            jj -= 1
            avail = sizes[jj]
        return lo, hi

    def _rows_in(self, i: int, lo: int, hi: int, remove: bool) -> list[Any]:
        """Bin ``i``'s rows ``lo:hi`` in (length, form, position) order; removed if ``remove``."""
        by_len, lengths, out, first, total = self.by_len, self.lengths[i], [], 0, 0  # first: a group's first row
        for n in lengths:
            g = by_len[n]
            size = _size(g)
            a, z = max(lo - first, 0), min(hi - first, size)
            first += size
            if a < z:
                out += self._take(g, n, a, z, remove)
                total += (z - a) * n
            elif first >= hi:
                break
        if remove:
            self.held -= hi - lo
            self.counts[i] -= hi - lo
            self.tokens[i] -= total
            if not _size(by_len[self.longest[i]]):  # the longest group emptied: the next longest held
                self.longest[i] = next((n for n in reversed(lengths) if _size(by_len[n])), 0)
        return out

    def _cut(self, i: int, start: int) -> list[Any]:
        """Remove and return a batch from bin ``i``: the run from ``start``, longest first."""
        lo, hi = self._run_of(i, start)
        return self._rows_in(i, lo, hi, remove=True)[::-1]

    def _batch(self, t: list | tuple) -> list[Any]:
        """A tail batch: rows (from a loaded state) or a planned ``(bin, lo, hi)``."""
        return list(t) if isinstance(t, list) else self._rows_in(*t, remove=False)[::-1]

    def _emit(self) -> list[Any]:
        """One batch from the buffer (step 3 of the class docstring). Plain Python over the
        bins' counters: it runs once per batch, and numpy's per-call cost would dominate."""
        counts, bs = self.counts, self.b.batch_size
        if self.b.max_tokens is None:
            full = [c if c > bs else 0 for c in counts]
        else:
            full = [c if c and self._over(c, t, m) else 0 for c, t, m in zip(counts, self.tokens, self.longest)]
        if not any(full):  # no bin holds a whole batch: the fullest
            top = max(counts)
            full = [c if c == top else 0 for c in counts]
        if self.b.shuffle:  # a bin with chance proportional to its rows, then a start in it
            u, v = self.rng.random(2).tolist()
            cum = list(itertools.accumulate(full))
            i = bisect.bisect_right(cum, u * cum[-1])
            start = int(v * counts[i])
        else:
            i, start = full.index(max(full)), 0
        return self._cut(i, start)

    def _drain(self) -> None:
        """Cut every bin into batches and order them (step 5). The batches are planned, as
        ``(bin, lo, hi)`` runs of the bins as they stand, and their rows made only as each
        leaves: a tail of ``buffer_size`` rows made at once would live through collections
        and be promoted to the oldest generation, as held rows would."""
        if self.edges is None:
            self._estimate_bins()
        plan = []
        for i in range(len(self.lengths)):
            start = 0
            while start < self.counts[i]:  # cutting from the bin's start each time: runs end to end
                _, hi = self._run_of(i, start, below=False)
                plan.append((i, start, hi))
                start = hi
        order = self.rng.permutation(len(plan)) if self.b.shuffle else range(len(plan))
        self.tail = [plan[i] for i in order]

    def run(self) -> Iterator[list[Any]]:
        """The pass's batches. Rows are read up to ``_CHUNK`` at a time, never past the row
        that fills the buffer (or the sample, before the bins are known), so a batch leaves
        at the same row as if they were read one by one."""
        b, size, shards = self.b, self.b.buffer_size, self.num_shards
        if not self.done:
            while self.edges is not None and self.held >= size:  # a resumed pass stopped between these batches
                yield self._emit()
            skip = (self.shard - self.consumed) % shards
            position = self.consumed + skip  # of this shard's next row
            rows = itertools.islice(self._items(), skip, None, shards)  # this shard's rows
            while True:
                goal = b.bin_sample if self.edges is None else size  # rows held before the next step
                need = min(goal - self.held, _CHUNK)
                chunk = list(itertools.islice(rows, need))
                read = len(chunk)
                if read:
                    self._hold(chunk, position)
                    position += read * shards
                    self.consumed = position - shards + 1  # past the last row read
                del chunk  # held flat now: the rows themselves are not kept
                if read < need:
                    break
                if self.held < goal:
                    continue
                if self.edges is None:
                    self._estimate_bins()
                while self.held >= size:
                    yield self._emit()
            self.done = True
            self._drain()
        while self.tail:
            yield self._batch(self.tail.pop(0))


def until_first_rank_ends(batches: Iterable[Any], group=None) -> Iterator[Any]:
    """Yield ``batches`` while every rank still has one: the uneven end of a streamed epoch.

    Each step all-reduces one flag (``MIN`` of "I have a batch"), so all ranks stop
    together at the first rank's end instead of one waiting forever in a collective;
    the batches other ranks still held are dropped for this epoch (the next epoch draws
    anew). A trainer that all-reduces per step already can fold the flag into that call.
    Without an initialised process group (or with one rank) it passes ``batches`` through.

    Args:
        batches: this rank's batches (e.g. a ``DataLoader`` over a :class:`StreamBucketBatcher`).
        group: the process group (``None``: the default one).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, _END)
        flag = torch.tensor([0 if batch is _END else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            return
        yield batch


_END = object()


# --------------------------------------------------------------------------- a streamed source


def stream_splits(cfg, tokenizer=None, *, sample_lines: int | None = None) -> dict[str, Iterable[dict]]:
    """Encoded rows per split, read with ``datasets.load_dataset(..., streaming=True)``.

    Nothing is written: each split is a Hugging Face ``IterableDataset`` whose rows are
    ``{"input_ids": [<bos>, ids..., <eos>]}`` (the convention of ``pipeline.prepare``),
    encoded on the fly by ``pipeline.encode`` (the encoder of ``pipeline.prepare``) in
    batches of ``cfg.batch_size`` lines. Feed a split to :class:`StreamBucketBatcher`.

    Args:
        cfg: the recipe's ``data:`` section (``pipeline.config.DataConfig``); its
            ``source`` (a hub id or local files, read by ``pipeline.sources``),
            ``text_column``, ``mode``, ``errors`` and ``tokenizer`` are honoured.
            ``max_len``/``overflow`` apply per row (``pipeline.encode.apply_max_len``,
            as in ``pipeline.prepare``).
        tokenizer: a ``tokenizers.Tokenizer``; ``None`` loads ``cfg.tokenizer.path`` or,
            if that is unset, trains ``cfg.tokenizer`` on the first ``sample_lines``
            lines of the train stream.
        sample_lines: lines of train a tokenizer is trained on when none is given
            (``None``: ``cfg.stream.sample_lines``).

    Returns:
        ``{"train": ..., "validation": ..., "test": ...}`` for the splits the source has
        (no validation split is held out: a stream has no random access). To get the
        tokenizer too (its ``<pad>`` id, its vocabulary size), use :func:`open_stream`.
    """
    return open_stream(cfg, tokenizer, sample_lines=sample_lines)[0]


def open_stream(cfg, tokenizer=None, *, sample_lines: int | None = None):
    """Like :func:`stream_splits`, also returning the tokenizer (to save next to checkpoints).

    Returns:
        ``(splits, tokenizer)``.
    """
    import datasets

    from pipeline.encode import Encoder
    from pipeline.errors import UserError
    from pipeline.sources import load_splits
    from pipeline.tokenizer import build_tokenizer, special_ids

    raw = load_splits(cfg, streaming=True)
    col = cfg.text_column
    if tokenizer is None:
        if cfg.tokenizer.path is None:
            first = list(itertools.islice(iter(raw["train"]), sample_lines or cfg.stream.sample_lines))
            if first and col not in first[0]:
                raise UserError(f"the train stream has no column {col!r} (columns: {', '.join(first[0])}); set data.text_column")
            sample = datasets.Dataset.from_dict({col: [r[col] for r in first]})
            tokenizer = build_tokenizer(cfg, sample, col, quiet=True)
        else:
            tokenizer = build_tokenizer(cfg, None, col, quiet=True)
    ids = special_ids(tokenizer, where="tokenizer")
    kwargs = {"encoder": Encoder(tokenizer, ids["<bos>"], ids["<eos>"]), "column": col,
              "max_len": cfg.max_len, "overflow": cfg.overflow}
    # every source column goes: a row may become several (overflow=split), which other columns could not follow
    out = {split: ds.map(_stream_rows, fn_kwargs=kwargs, batched=True, batch_size=cfg.batch_size,
                         remove_columns=list(ds.column_names or [col]))
           for split, ds in raw.items()}
    return out, tokenizer


def _stream_rows(batch: dict, encoder: Encoder, column: str, max_len: int | None, overflow: str) -> dict:
    """``IterableDataset.map`` function: a batch's texts → ``<bos> ids <eos>`` rows, ``max_len`` applied."""
    from pipeline.encode import apply_max_len

    return {"input_ids": apply_max_len(encoder.encode(batch[column]), max_len, overflow)}
